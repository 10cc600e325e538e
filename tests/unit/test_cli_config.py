"""Flags from settings fields, ``fedsea config example``, and commands that honour every flag they take."""

from __future__ import annotations

import dataclasses

import pytest

from fedsea.cli.fed import join_settings
from fedsea.cli.main import build_parser, main
from fedsea.cli.wire import serve_settings
from fedsea.config import LoraSpec, OptimConfig, ServerLimits, SplitConfig, WireConfig
from fedsea.federation.config import MODES
from fedsea.federation.simconfig import FederationSettings, RunConfig, load_config


@pytest.mark.parametrize("mode", MODES)
def test_config_example_is_a_complete_run_file_that_loads_as_it_is(tmp_path, capsys, mode):
    assert main(["config", "example", "--mode", mode]) == 0
    text = capsys.readouterr().out
    run = tmp_path / "run.toml"
    run.write_text(text)
    assert load_config(run) == RunConfig(federation=FederationSettings(mode=mode))
    # Every section and every setting is in it, documented.
    for section, value in dataclasses.asdict(RunConfig()).items():
        if isinstance(value, dict):
            assert f"[{section}]" in text
            for key in value:
                given = (f"\n{key} = ", f"\n# {key} = ", f"\n# [{section}.{key}]")  # a key, or an unset table
                assert any(g in text for g in given), (section, key)
    assert "# [[clients]]" in text and text.count("\n# ") > 60


def _join(run, *flags):
    args = build_parser().parse_args(["join", "--server", "localhost:1", "--run", str(run), "--client", "client-1"])
    _, me, model, wire = join_settings(args)
    args = build_parser().parse_args(
        ["join", "--server", "localhost:1", "--run", str(run), "--client", "client-1", *flags]
    )
    return (me, model, wire), join_settings(args)[1:]


def test_join_takes_the_run_files_client_and_the_flags_given_over_it(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text(
        '[model]\nsource = "tiny-llama"\n[client]\nhead_layers = 3\n[[clients]]\n[[clients]]\ntail_layers = 1\n'
        '[wire]\ndtype = "bf16"\nlatency_ms = 5\n'
    )
    (me, model, wire), given = _join(
        run, "--model", "random:llama-2-7b", "--head-layers", "1", "--tail-layers", "2", "--wire-dtype", "fp16",
        "--net-latency-ms", "0", "--net-mbps", "100",
    )  # fmt: skip
    # No flag: the run file's settings for client-1.
    assert (me.name, me.head_layers, me.tail_layers, model.source) == ("client-1", 3, 1, "tiny-llama")
    # The wire dtype is the run file's; its WAN emulation is not (simulate passes it as flags):
    # a real deployment never sleeps because a run file came from a simulation.
    assert (wire.dtype, wire.latency_ms, wire.mbps) == ("bf16", 0.0, None)
    # Each flag given wins (the bug: join accepted these and ignored them).
    me, model, wire = given
    assert (me.head_layers, me.tail_layers, model.source) == (1, 2, "random:llama-2-7b")
    assert (wire.dtype, wire.latency_ms, wire.mbps) == ("fp16", 0.0, 100.0)
    assert me.batch_size == 4  # what no flag names stays the run file's


def test_join_checks_its_flags_like_the_run_file(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text("")
    args = build_parser().parse_args(
        ["join", "--server", "x:1", "--run", str(run), "--client", "client-0", "--head-layers", "0"]
    )
    with pytest.raises(ValueError, match="head_layers must be an integer >= 1"):
        join_settings(args)


def test_serve_takes_limits_and_model_from_the_run_file_and_the_flags_over_them(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text('[model]\nsource = "tiny-llama"\n[limits]\nmax_batch = 8\nidle_timeout_s = 30\n')
    args = build_parser().parse_args(["serve", "--run", str(run), "--max-batch", "16"])
    config, limits, model = serve_settings(args)
    assert limits == ServerLimits(max_batch=16, idle_timeout_s=30.0) and model.source == "tiny-llama"
    assert config == load_config(run)
    _, limits, model = serve_settings(build_parser().parse_args(["serve"]))
    assert limits == ServerLimits() and model == RunConfig().model


def test_client_commands_default_to_the_settings_classes():
    args = build_parser().parse_args(["train", "--server", "x:1", "--data", "d.jsonl", "--targets", "q_proj,v_proj"])
    assert (args.head_layers, args.tail_layers) == (SplitConfig().head_layers, SplitConfig().tail_layers)
    assert (args.wire_dtype, args.net_latency_ms, args.net_mbps) == ("auto", 0.0, None) == (
        WireConfig().dtype, WireConfig().latency_ms, WireConfig().mbps,
    )  # fmt: skip
    assert (args.lora_r, args.lora_dropout, args.lr) == (LoraSpec().r, LoraSpec().dropout, OptimConfig().lr)
    assert args.targets == ("q_proj", "v_proj")
    bench = build_parser().parse_args(["bench", "train"])
    assert (bench.head_layers, bench.wire_dtype) == (2, "auto")


def test_the_federated_demo_refuses_the_split_only_flags(capsys):
    assert main(["demo", "--prompt", "hello"]) == 2
    assert "--split-only" in capsys.readouterr().err
    assert main(["demo", "--split-only", "client.head_layers=1"]) == 2


def test_simulate_resume_takes_overrides_and_refuses_what_it_would_ignore(tmp_path, capsys):
    assert main(["simulate", "other.toml", "--resume", str(tmp_path)]) == 2
    assert "drop 'other.toml'" in capsys.readouterr().err
    assert main(["simulate", "--resume", str(tmp_path), "--run-dir", str(tmp_path)]) == 2
    assert "drop --run-dir" in capsys.readouterr().err


def test_bench_generate_refuses_a_latency_it_cannot_use(capsys):
    assert main(["bench", "generate", "--net-latency-ms", "0"]) == 2
    assert "--net-latency-ms > 0" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # bench load takes no split or wire flags
        build_parser().parse_args(["bench", "load", "--head-layers", "1"])
