"""The wire compression as a setting: WireConfig, the run file, the flags (issue 13)."""

from __future__ import annotations

import pytest

from fedsea.cli.fed import join_settings
from fedsea.cli.main import build_parser, main
from fedsea.config import WIRE_COMPRESSIONS, WireConfig
from fedsea.federation.simconfig import load_config
from fedsea.wire import compress


def test_wire_config_takes_a_known_compression_and_defaults_to_none():
    assert WireConfig().compression == "none"
    assert {WireConfig(compression=name).compression for name in WIRE_COMPRESSIONS} == set(WIRE_COMPRESSIONS)
    with pytest.raises(ValueError, match=r"compression must be one of none, int8, fp8, got 'zip'"):
        WireConfig(compression="zip")
    # Every setting name is a codec (the same names in config and in the codec).
    assert set(WIRE_COMPRESSIONS) >= set(compress.COMPRESSIONS)


def test_the_run_files_wire_section_documents_and_takes_it(tmp_path, capsys):
    assert main(["config", "example"]) == 0
    text = capsys.readouterr().out
    wire = text[text.index("[wire]") :]
    assert '\ncompression = "none"' in wire and "int8" in wire and "fp8" in wire
    run = tmp_path / "run.toml"
    run.write_text('[wire]\ncompression = "int8"\n')
    assert load_config(run).wire.compression == "int8"
    run.write_text('[wire]\ncompression = "gzip"\n')
    with pytest.raises(ValueError, match="compression"):
        load_config(run)


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--server", "x:1", "--data", "d.jsonl"],
        ["generate", "--server", "x:1", "--prompt", "hi"],
        ["chat", "--server", "x:1"],
        ["bench", "train"],
    ],
)
def test_the_client_commands_take_wire_compression(command, capsys):
    assert build_parser().parse_args(command).wire_compression == "none"
    assert build_parser().parse_args([*command, "--wire-compression", "fp8"]).wire_compression == "fp8"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command, "--wire-compression", "zip"])
    assert "invalid choice: 'zip'" in capsys.readouterr().err


def test_join_takes_the_run_files_compression_unless_the_flag_is_given(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text('[wire]\ncompression = "int8"\n')
    base = ["join", "--server", "x:1", "--run", str(run), "--client", "client-0"]
    assert join_settings(build_parser().parse_args(base))[3].compression == "int8"
    assert join_settings(build_parser().parse_args([*base, "--wire-compression", "none"]))[3].compression == "none"


def test_train_help_documents_the_flag(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--wire-compression {none,int8,fp8}" in help_text and "(default: none)" in help_text


def test_a_client_refuses_an_unknown_compression_before_connecting():
    import fedsea
    from fedsea.client.split_client import SplitClient

    split = fedsea.split_model(fedsea.tiny_llama(num_layers=4, hidden_size=64, num_heads=4, vocab_size=512), 1, 1)
    with pytest.raises(ValueError, match="wire compression must be one of"):
        SplitClient("localhost:1", split, wire_compression="zip")
