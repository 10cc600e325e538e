"""``fedsea simulate`` picks its engine: Flower's Simulation Engine, the native one only where Flower
cannot run the run yet (``client-batch``), said on stderr, never silently; refusals are one line
before any folder or process (in-process through ``fedsea.cli.main.main``, the tiny model's config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedsea.cli.main import build_parser
from fedsea.federation.simconfig import load_plan
from fedsea.flower.simulation import pick_engine, run_engine
from tests.unit.test_cli_bad_inputs import RUN, one_line_error


@pytest.fixture
def run_file(tmp_path: Path) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(RUN)
    return path


@pytest.mark.parametrize("mode", ["hierarchical", "sequential", "client-batch"])
def test_every_mode_goes_to_flower_by_default(run_file, capsys, mode):
    plan = load_plan(run_file, [f'federation.mode="{mode}"'])
    assert pick_engine(plan) == "flower" and pick_engine(plan, "flower") == "flower"
    assert pick_engine(plan, "native") == "native"
    assert capsys.readouterr().err == ""
    with pytest.raises(ValueError, match="engine must be one of auto, flower, native"):
        pick_engine(plan, "ray")


def test_simulate_refuses_flower_flags_on_native(run_file, tmp_path, capsys):
    out = tmp_path / "out"
    for flag in (["--strategy", "fedadam"], ["--secure-aggregation"]):
        argv = ["simulate", str(run_file), "--engine", "native", *flag, "--run-dir", str(out)]
        one_line_error(capsys, argv, "Flower's")
    assert not out.exists()


def test_a_resume_goes_on_with_the_engine_the_run_started_on(tmp_path):
    assert run_engine(tmp_path) is None  # nothing yet: --resume picks as a new run does
    rounds = tmp_path / "server_rounds.jsonl"
    rounds.write_text('{"round": 1, "losses": {}}\n')  # a native coordinator's record (no engine)
    assert run_engine(tmp_path) == "native"
    rounds.write_text('{"round": 1, "losses": {}, "engine": "flower"}\n')
    assert run_engine(tmp_path) == "flower"
    (tmp_path / "engine").write_text("native\n")  # what fedsea simulate writes: it wins
    assert run_engine(tmp_path) == "native"


def test_flower_simulate_is_simulate_on_the_flower_engine():
    parser = build_parser()
    flower = parser.parse_args(["flower", "simulate", "r.toml", "--strategy", "fedadam"])
    plain = parser.parse_args(["simulate", "r.toml", "--strategy", "fedadam"])
    assert flower.func is plain.func and (flower.engine, plain.engine) == ("flower", "auto")
    assert flower.strategy == plain.strategy == "fedadam"


# -- fedsea serve --run and fedsea join: the native coordinator, with a pointer to Flower --------


@pytest.mark.parametrize(("mode", "says"), [("hierarchical", "deprecated for mode hierarchical"),
                                            ("client-batch", "deprecated for mode client-batch")])  # fmt: skip
def test_serve_run_and_join_say_they_are_the_native_coordinator(tmp_path, capsys, monkeypatch, mode, says):
    run = tmp_path / "run.toml"
    run.write_text(RUN.replace("[federation]\n", f'[federation]\nmode = "{mode}"\n'))
    shard = tmp_path / "shard.json"
    shard.write_text("[1, 2]")  # not a shard: join stops there, after the note
    join = ["join", "--server", "127.0.0.1:1", "--run", str(run), "--client", "client-0", "--shard", str(shard)]
    # serve --run stops at its --resume check, before the model loads: LATEST names a missing round.
    (tmp_path / "out" / "checkpoints").mkdir(parents=True)
    (tmp_path / "out" / "checkpoints" / "LATEST").write_text("round-0009\n")
    serve = ["serve", "--model", "tiny-llama", "--port", "0", "--run", str(run), "--run-dir", str(tmp_path / "out")]
    for argv, command in ((join, "fedsea join"), ([*serve, "--resume"], "fedsea serve --run")):
        from fedsea.cli.main import main

        assert main(argv) == 2
        err = capsys.readouterr().err
        notes = [line for line in err.splitlines() if line.startswith("fedsea: note:")]
        assert len(notes) == 1 and f"`{command}` is fedsea's native coordinator, {says}" in notes[0], err
        assert "flower-superlink" in notes[0] and "flwr run" in notes[0]
        # fedsea simulate --engine native starts them with FEDSEA_NATIVE_ENGINE=1: it asked for them.
        monkeypatch.setenv("FEDSEA_NATIVE_ENGINE", "1")
        assert main(argv) == 2
        assert "fedsea: note:" not in capsys.readouterr().err
        monkeypatch.delenv("FEDSEA_NATIVE_ENGINE")
