"""--device and --dtype on every command that loads a model, and the run file's device and dtype tables."""

from __future__ import annotations

import pytest

from fedsea.cli.fed import join_settings
from fedsea.cli.main import build_parser
from fedsea.cli.wire import serve_settings
from fedsea.config import Placement
from fedsea.federation.simconfig import example_run_file, load_config

COMMANDS = {
    "serve": ["serve"],
    "train": ["train", "--server", "x:1", "--data", "d.jsonl"],
    "generate": ["generate", "--server", "x:1", "--prompt", "hi"],
    "chat": ["chat", "--server", "x:1"],
    "join": ["join", "--server", "x:1", "--run", "r.toml", "--client", "client-0"],
    "simulate": ["simulate", "r.toml"],
    "eval": ["eval", "--task", "sst2"],
    "attack": ["attack"],
    "merge": ["merge", "a", "o", "--head-layers", "1", "--tail-layers", "1"],
    "export": ["export", "run", "out"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_model_command_takes_device_and_dtype(command):
    args = build_parser().parse_args([*COMMANDS[command], "--device", "cuda:1", "--dtype", "bf16"])
    assert (args.device, args.dtype) == ("cuda:1", "bf16")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_an_unknown_dtype_is_refused_by_the_parser(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*COMMANDS[command], "--dtype", "float64"])
    assert "invalid choice: 'float64'" in capsys.readouterr().err


def test_defaults_auto_for_the_model_commands_and_cpu_float32_for_merging():
    parser = build_parser()
    assert (parser.parse_args(COMMANDS["eval"]).device, parser.parse_args(COMMANDS["eval"]).dtype) == ("auto", "auto")
    export = parser.parse_args(COMMANDS["export"])
    assert (export.device, export.dtype) == ("cpu", "float32")
    # Commands that read a run file leave unset flags to it.
    assert parser.parse_args(COMMANDS["join"]).device is None
    assert parser.parse_args(COMMANDS["simulate"]).dtype is None


RUN = """
[model]
source = "tiny-llama"
device = "cpu"
dtype = "bf16"
[server]
device = "auto"
[client]
dtype = "fp32"
[[clients]]
[[clients]]
device = "cuda:1"
dtype = "fp16"
"""


def test_the_run_file_places_the_server_and_each_client(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(RUN)
    config = load_config(path)
    server = config.server_model()
    assert (server.source, server.device, server.dtype) == ("tiny-llama", "auto", "bf16")  # dtype from [model]
    plans = config.client_plans()
    # [[clients]] over [client] over [model].
    assert [(c.device, c.dtype) for c in plans] == [("cpu", "fp32"), ("cuda:1", "fp16"), ("cpu", "fp32")]
    assert plans[1].placement() == Placement("cuda:1", "fp16")
    base = ["--server", "x:1", "--run", str(path)]
    _, me, model, _ = join_settings(build_parser().parse_args(["join", *base, "--client", "client-1"]))
    assert (me.name, model.device, model.dtype) == ("client-1", "cuda:1", "fp16")
    _, _, model, _ = join_settings(
        build_parser().parse_args(["join", *base, "--client", "client-1", "--device", "cpu"])
    )
    assert (model.device, model.dtype) == ("cpu", "fp16")  # a flag wins over the file
    _, _, served = serve_settings(build_parser().parse_args(["serve", "--run", str(path), "--dtype", "fp32"]))
    assert (served.device, served.dtype) == ("auto", "fp32")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.device=gpu", "model.device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        ("server.dtype=int8", "server.dtype must be auto, float32"),
        ("client.device=cuda:x", "client.device must be"),
        ("wire.dtype=fp64", "wire.dtype must be one of auto, fp32, bf16, fp16"),
    ],
)
def test_bad_devices_and_dtypes_in_a_run_file_name_the_setting(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_the_example_run_file_documents_devices_and_dtypes(tmp_path):
    text = example_run_file()
    assert "[server]" in text and 'device = "auto"' in text and "# device =  (unset)" in text
    path = tmp_path / "example.toml"
    path.write_text(text)
    assert load_config(path) == load_config(None)


def test_simulate_passes_device_and_dtype_on_as_model_overrides(monkeypatch, capsys):
    import fedsea.flower.simulation as sim
    from fedsea.cli.main import main

    seen = {}

    def fake(config, overrides, **kwargs):
        seen.update(config=config, overrides=overrides)
        return {"report": "r.md"}

    monkeypatch.setattr(sim, "simulate", fake)
    assert main(["simulate", "r.toml", "task.eval_limit=5", "--device", "cpu", "--dtype", "bf16"]) == 0
    assert seen["overrides"] == ["task.eval_limit=5", 'model.device="cpu"', 'model.dtype="bf16"']
    load_config(None, seen["overrides"])  # they load as the run file's [model] keys
