"""Issue 18 item 2: ``fedsea profile``, ``fedsea plan`` and ``fedsea bench plan`` end to end on the tiny model."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from fedsea.cli.main import main
from fedsea.federation.simconfig import load_config

RUN = """
[model]
source = "tiny-llama"
[federation]
clients = 2
rounds = 2
local_steps = 4
mode = "hierarchical"
[client]
head_layers = 1
tail_layers = 1
batch_size = 2
max_length = 8
[[clients]]
[[clients]]
cuts = [[1, 1, 1], [2, 2, 1]]
"""


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def fedsea_cli(capsys):
    """``fedsea ARGS`` in this process (the parser, the command and its one-line errors, as from a shell)."""

    def run(*args: str) -> Ran:
        code = main(list(args))
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return run


def test_profile_then_plan_recommends_and_writes_the_cuts(tmp_path, fedsea_cli):
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN)
    prof = tmp_path / "prof.json"
    made = fedsea_cli("profile", "--run", str(run_file), "--out", str(prof), "--repeats", "1")
    assert made.returncode == 0, made.stderr
    assert json.loads(made.stdout)["batch"] == 2 and prof.is_file()
    out = tmp_path / "planned.toml"
    planned = fedsea_cli("plan", "--run", str(run_file), "--profile", str(prof), "--link", "client-1=50:10",
                      "--max-layers", "2", "--json", "--write", str(out))  # fmt: skip
    assert planned.returncode == 0, planned.stderr
    plan = json.loads(planned.stdout)["plan"]
    # Every feasible cut of each client (p, q <= 2, p + q < 4), predictions that add up.
    assert {(x["head_layers"], x["tail_layers"]) for x in plan["cuts"]["client-0"]} == {(1, 1), (1, 2), (2, 1)}
    for x in plan["cuts"]["client-1"]:
        parts = x["client_s"] + x["wire_s"] + x["server_s"] + x["waiting_s"]
        assert abs(x["step_s"] - parts) <= 3e-4  # five figures, each rounded to 0.1 ms in the JSON
        # 4 messages of 2 x 8 x 64 fp32 values, each 50 ms plus its size over 10 Mbit/s
        assert x["wire_s"] > 4 * (0.05 + 2 * 8 * 64 * 4 * 8 / 10e6) and x["leakage"] is None
    assert plan["profiles"] == {"client-0": "file", "client-1": "file", "server": "file"}
    chosen = {x["client"]: (x["head_layers"], x["tail_layers"]) for x in plan["recommended"]}
    written = load_config(out)  # the written run file loads, with each client's recommended cut, no schedule
    assert [(c.head_layers, c.tail_layers) for c in written.client_plans()] == [chosen["client-0"], chosen["client-1"]]
    assert all(c.cuts is None for c in written.client_plans()) and written.federation.rounds == 2
    table = fedsea_cli("plan", "--run", str(run_file), "--profile", str(prof), "--max-layers", "2")
    assert table.returncode == 0, table.stderr
    assert "client-1: predicted seconds per step" in table.stdout and "recommended: client-0 (p, q) = " in table.stdout
    assert "not measured" in table.stdout and "no attack grid of tiny-llama" in table.stdout


def test_write_drops_every_schedule_and_keeps_the_overrides(tmp_path, fedsea_cli):
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN.replace("[client]\n", "[client]\ncuts = [[2, 2, 1]]\n"))
    prof = tmp_path / "prof.json"
    assert fedsea_cli("profile", "--run", str(run_file), "--out", str(prof), "--repeats", "1").returncode == 0
    out = tmp_path / "planned.toml"
    done = fedsea_cli("plan", "--run", str(run_file), "--profile", str(prof), "--max-layers", "2", "--json",
                      "--write", str(out), "federation.rounds=3")  # fmt: skip
    assert done.returncode == 0, done.stderr
    chosen = [(x["head_layers"], x["tail_layers"]) for x in json.loads(done.stdout)["plan"]["recommended"]]
    written = load_config(out)
    assert written.federation.rounds == 3  # the override planned with is the one written
    # Every round of every client at its recommended cut: the [client] schedule is gone too.
    assert [[c.cut_at(r) for r in (1, 2, 3)] for c in written.client_plans()] == [[cut] * 3 for cut in chosen]


def test_plan_errors_are_one_line(tmp_path, fedsea_cli):
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN)
    bad = fedsea_cli("plan", "--run", str(run_file), "--link", "fast")
    assert bad.returncode == 2 and "LATENCY_MS:MBPS" in bad.stderr and "Traceback" not in bad.stderr
    (tmp_path / "junk.json").write_text("[]")
    bad = fedsea_cli("plan", "--run", str(run_file), "--profile", str(tmp_path / "junk.json"))
    assert bad.returncode == 2 and "not a fedsea plan profile" in bad.stderr
    # Under a leakage ceiling, cuts without a measured figure are out: none is left for tiny-llama.
    prof = tmp_path / "prof.json"
    assert fedsea_cli("profile", "--run", str(run_file), "--out", str(prof), "--repeats", "1").returncode == 0
    bad = fedsea_cli("plan", "--run", str(run_file), "--profile", str(prof), "--max-leakage", "0.5")
    assert bad.returncode == 2 and "no cut has a measured figure" in bad.stderr
    other = fedsea_cli("plan", "--run", str(run_file), "--profile", str(prof), "client.batch_size=4")
    assert other.returncode == 2 and "profile it at the run's" in other.stderr
    # A profile of another LoRA (or model, wire dtype, compression) is refused, not silently used.
    other = fedsea_cli("plan", "--run", str(run_file), "--profile", str(prof), "lora.r=4")
    assert other.returncode == 2 and "a profile is of LoRA" in other.stderr
    for args, words in (
        (["--link", "client-9=20"], "not a client of the run"),
        (["--client-profile", f"client0={prof}"], "not a client of the run"),
        (["--grid", str(tmp_path)], "give an attack_grid.json"),
        (["--max-client-memory-gib", "inf"], "must be a positive number"),
        (["--max-leakage", "2"], "in [0, 1]"),
        (["--write", str(tmp_path / "out.yaml")], "give a .toml path"),
        (["--write", str(tmp_path / "nowhere" / "out.toml")], "does not exist"),
    ):
        bad = fedsea_cli("plan", "--run", str(run_file), "--profile", str(prof), *args)
        assert bad.returncode == 2 and words in bad.stderr, (args, bad.stderr)
    # --grid is repeatable and leaves the overrides alone.
    grid = tmp_path / "attack_grid.json"
    grid.write_text(json.dumps([{"defence": "none", "head_layers": 1, "relative_sigma": 0.14, "sigma": 1.0,
                                 "clip_norm": None, "token_accuracy": 0.75}]))  # fmt: skip
    ok = fedsea_cli("plan", "--run", str(run_file), "--profile", str(prof), "--grid", str(grid), "--json",
                    "federation.local_steps=7")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    plan = json.loads(ok.stdout)["plan"]
    assert plan["local_steps"] == 7 and {x["leakage"] for x in plan["cuts"]["client-0"] if x["head_layers"] == 1} == {
        0.75
    }


def test_bench_plan_sets_predictions_against_real_steps(fedsea_cli):
    run = fedsea_cli("bench", "plan", "--model", "tiny-llama", "--batch", "2", "--tokens", "8", "--cuts", "1,1", "2,1",
                  "--latencies-ms", "0", "--steps", "1", "--repeats", "1")  # fmt: skip
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["bench"] == "plan" and result["cases"] == 2 and len(result["rows"]) == 2
    for row in result["rows"]:
        assert row["measured_s"] > 0 and row["predicted_s"] > 0
        # The bytes are predicted exactly: four B x n x d tensors, plus the wire's few framing bytes.
        assert 0 <= row["measured_bytes_per_step"] - row["bytes_per_step"] < 400


def test_profile_measures_the_link_to_a_real_server_through_a_delayed_tcp_link(tmp_path, fedsea_cli):
    from fedsea.model.load import load_model
    from fedsea.server.app import ServerThread, TrunkServer
    from fedsea.server.trunk import TrunkHost
    from fedsea.wire.delay_proxy import ProxyProcess

    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN)
    thread = ServerThread(TrunkServer(TrunkHost(load_model("tiny-llama"))))
    port = thread.start()
    prof = tmp_path / "prof.json"
    try:
        with ProxyProcess(f"127.0.0.1:{port}", latency_ms=40) as address:  # every byte 40 ms late, each way
            made = fedsea_cli("profile", "--run", str(run_file), "--out", str(prof), "--repeats", "1",
                              "--server", address)  # fmt: skip
    finally:
        thread.stop()
    assert made.returncode == 0, made.stderr
    link = json.loads(made.stdout)["link"]
    assert 35 <= link["latency_ms"] <= 40 + 60, link  # the hops add a little, never take any away
    # plan uses the measured link for that client: four messages, each at least the latency
    planned = fedsea_cli("plan", "--run", str(run_file), "--profile", str(prof), "--max-layers", "2", "--json")
    assert planned.returncode == 0, planned.stderr
    rows = json.loads(planned.stdout)["plan"]["cuts"]["client-0"]
    assert all(x["wire_s"] >= 4 * link["latency_ms"] / 1000 for x in rows)
