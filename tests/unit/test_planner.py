"""Issue 18 item 2: the planner's step-time model, its recommendation, the leakage column and profiles."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from fedsea.federation.plan_leakage import NoiseLevel, best_recovery, default_grids, grid_model, read_rows
from fedsea.federation.plan_measure import measure_profile
from fedsea.federation.plan_profile import (
    MEMORY_PARTS,
    SEGMENTS,
    Line,
    PartyProfile,
    load_profile,
    profile_cuts,
    save_profile,
)
from fedsea.federation.planner import (
    Constraints,
    Link,
    Party,
    all_cuts,
    base_prediction,
    recommend,
    round_seconds,
    with_waiting,
)

L = 10


def profile(
    client_block: float = 0.01, trunk_block: float = 0.02, codec: float = 0.001, batch: int = 2
) -> PartyProfile:
    """A synthetic profile with round numbers: every segment's line is known."""
    seconds = {}
    for seg in SEGMENTS:
        per = trunk_block if seg.startswith("trunk") else client_block
        seconds[seg] = Line(fixed=0.005, per_block=per)
    return PartyProfile(
        model="m", num_layers=L, hidden_size=8, batch=batch, tokens=4, device="cpu", dtype="float32",
        wire_dtype="fp32", lora_r=8, host="test", seconds=seconds,
        activation_bytes={p: Line(100.0, 1000.0) for p in MEMORY_PARTS}, block_weight_bytes=10_000,
        block_adapter_bytes=100, client_fixed_weight_bytes=50_000, codec_s=codec, created=0.0,
    )  # fmt: skip


def test_a_step_is_client_plus_wire_plus_server_read_off_the_lines():
    prof = profile()
    x = base_prediction(Party("c", prof, Link(20.0, 8.0), prof), (2, 3))
    # client: head fwd+bwd at 2 blocks, tail fwd+bwd at 3, optimizer at 5 (each 0.005 fixed)
    client = 2 * (0.005 + 0.01 * 2) + 2 * (0.005 + 0.01 * 3) + (0.005 + 0.01 * 5)
    server = 3 * (0.005 + 0.02 * 5)  # trunk forward, backward and optimizer at L - 5 blocks
    message = 2 * 4 * 8 * 4  # B x n x d x fp32
    wire = 4 * (0.020 + message * 8 / 8e6 + 0.001)
    assert math.isclose(x.client_s, client) and math.isclose(x.server_s, server) and math.isclose(x.wire_s, wire)
    assert math.isclose(x.step_s, client + server + wire) and x.waiting_s == 0
    assert x.bytes_per_step == 4 * message
    adapters, activations, buffers = 4 * 5 * 100, (100 + 2000) + (100 + 3000), 4 * message
    assert x.client_memory_bytes == 50_000 + 5 * 10_000 + adapters + activations + buffers
    assert x.client_process_bytes == x.client_memory_bytes + 5 * 10_000  # the trunk's base blocks too
    with pytest.raises(ValueError, match="does not fit"):
        base_prediction(Party("c", prof, Link(), prof), (5, 5))


def test_all_cuts_keep_a_trunk_block_and_the_bound():
    assert all_cuts(4) == [(1, 1), (1, 2), (2, 1)]
    assert all(p + q < L and max(p, q) <= 3 for p, q in all_cuts(L, 3)) and len(all_cuts(L, 3)) == 9


def test_recommendation_is_the_fastest_cut_and_respects_ceilings():
    # Client blocks cost less than trunk blocks here: the fastest cut keeps the most blocks.
    prof = profile(client_block=0.001, trunk_block=0.05)
    parties = [Party("client-0", prof, Link(), prof)]
    cuts = all_cuts(L, 4)
    leakage = {1: 0.99, 2: 0.9, 4: 0.5}
    table, chosen, round_s = recommend(parties, cuts, leakage, "sequential", 10)
    assert (chosen[0].head_layers, chosen[0].tail_layers) == (4, 4)
    assert chosen[0] == min(table["client-0"], key=lambda x: x.step_s) and math.isclose(round_s, 10 * chosen[0].step_s)
    # A leakage ceiling leaves only measured ps under it (p = 3 is not measured: never chosen).
    _, chosen, _ = recommend(parties, cuts, leakage, "sequential", 10, Constraints(max_leakage=0.95))
    assert chosen[0].head_layers in (2, 4) and chosen[0].leakage is not None and chosen[0].leakage <= 0.95
    _, chosen, _ = recommend(parties, cuts, leakage, "sequential", 10, Constraints(max_leakage=0.6))
    assert chosen[0].head_layers == 4
    # A memory ceiling below the largest cuts' memory moves the choice to fewer client blocks.
    small = base_prediction(parties[0], (1, 1)).client_process_bytes
    _, chosen, _ = recommend(parties, cuts, leakage, "sequential", 10, Constraints(max_client_memory=small))
    assert (chosen[0].head_layers, chosen[0].tail_layers) == (1, 1)
    with pytest.raises(ValueError, match=r"leakage ceiling of 0.1 \(the lowest measured is 0.500"):
        recommend(parties, cuts, leakage, "sequential", 10, Constraints(max_leakage=0.1))
    with pytest.raises(ValueError, match="client memory ceiling"):
        recommend(parties, cuts, leakage, "sequential", 10, Constraints(max_client_memory=1))


def test_parts_with_different_lora_get_one_common_cut():
    fast_client = profile(client_block=0.001, trunk_block=0.05)
    slow_client = profile(client_block=0.2, trunk_block=0.05)
    parties = [Party("client-0", fast_client, Link(), fast_client), Party("client-1", slow_client, Link(), fast_client)]
    cuts = all_cuts(L, 4)
    _, free, _ = recommend(parties, cuts, {}, "hierarchical", 5)
    assert free[0].cut != free[1].cut  # left alone, each client takes its own best cut
    table, common, round_s = recommend(parties, cuts, {}, "hierarchical", 5, common_cut=True)
    assert common[0].cut == common[1].cut
    # The common cut is the best one for the round among all shared cuts.
    for cut in cuts:
        at = [next(x for x in table[p.name] if x.cut == cut) for p in parties]
        assert (
            round_s
            <= round_seconds(
                with_waiting(
                    [dataclasses.replace(x, waiting_s=0.0, step_s=x.step_s - x.waiting_s) for x in at], "hierarchical"
                ),
                "hierarchical",
                5,
            )
            + 1e-9
        )


def test_waiting_for_other_clients_by_mode():
    prof = profile()
    a = base_prediction(Party("a", prof, Link(10.0), prof), (1, 1))
    b = base_prediction(Party("b", prof, Link(50.0), prof), (2, 2))
    assert with_waiting([a, b], "sequential") == [a, b]
    assert math.isclose(round_seconds([a, b], "sequential", 3), 3 * (a.step_s + b.step_s))
    hier = with_waiting([a, b], "hierarchical")
    assert all(
        x.waiting_s > 0 and math.isclose(x.step_s, y.step_s + x.waiting_s) for x, y in zip(hier, [a, b], strict=True)
    )
    assert all(x.step_s >= a.server_s + b.server_s for x in hier)  # the server's work per step bounds it
    assert math.isclose(round_seconds(hier, "hierarchical", 3), 3 * max(x.step_s for x in hier))
    # client-batch: clients at one cut share one joined trunk pass a step (it costs the sum, after the
    # last arrival); clients at different cuts are different groups, queued as hierarchical ones are.
    a2 = base_prediction(Party("a2", prof, Link(50.0), prof), (1, 1))
    joined = with_waiting([a, a2], "client-batch")
    step = max(x.client_s + x.wire_s for x in (a, a2)) + a.server_s + a2.server_s
    assert all(math.isclose(x.step_s, step) for x in joined)
    apart = with_waiting([a, b], "client-batch")
    assert [x.step_s for x in apart] == [x.step_s for x in with_waiting([a, b], "hierarchical")]
    with pytest.raises(ValueError, match="mode must be"):
        with_waiting([a, b], "gossip")
    # A server-bound pair: the floor (the sum of both trunk times) is the step.
    slow = profile(client_block=0.0, trunk_block=1.0)
    c = base_prediction(Party("c", slow, Link(), slow), (1, 1))
    bound = with_waiting([c, dataclasses.replace(c, client="d")], "hierarchical")
    assert all(math.isclose(x.step_s, 2 * c.server_s) for x in bound)


def test_links_and_parties_reject_bad_input():
    assert Link.parse("20") == Link(20.0) and Link.parse("20:100") == Link(20.0, 100.0)
    for bad in ("fast", "20:x", "-1", "5:0"):
        with pytest.raises(ValueError):
            Link.parse(bad)
    with pytest.raises(ValueError, match="profile both at the run's model, batch and length"):
        Party("c", profile(batch=2), Link(), profile(batch=4))


def test_line_fit_and_profile_cuts():
    assert Line.fit(1, 1.0, 3, 2.0) == Line(0.5, 0.5)
    assert Line.fit(2, 1.0, 2, 1.0, slope=0.25) == Line(0.5, 0.25)  # one count: the given slope
    assert Line.fit(1, 2.0, 3, 1.0).per_block == 0.0  # noise tilting a line downward: flat
    with pytest.raises(ValueError):
        Line.fit(2, 1.0, 2, 1.0)
    assert profile_cuts(30) == ((1, 1), (10, 10)) and profile_cuts(4) == ((1, 1), (2, 1))
    with pytest.raises(ValueError, match="at least 4 blocks"):
        profile_cuts(3)


def test_measured_profile_round_trips_and_bad_files_are_refused(tmp_path):
    prof = measure_profile("tiny-llama", batch=2, tokens=8, repeats=1)
    assert (prof.num_layers, prof.batch, prof.tokens, prof.wire_dtype) == (4, 2, 8, "fp32")
    assert all(prof.seconds[s].at(2) > 0 for s in SEGMENTS) and prof.codec_s > 0
    # Autograd keeps tensors per block (bytes are exact, not timed): each block adds the same.
    assert prof.activation_bytes["trunk"].per_block > 0 and prof.block_weight_bytes > prof.block_adapter_bytes > 0
    # The weights a frozen layer saves for its input's gradient are not activations: the tail's fixed
    # part (norm, LM head, loss: the logits and their softmax) is below the LM head's own weights plus
    # those tensors, and a block's saved bytes do not hold its weights.
    logits = 2 * 8 * 512 * 4  # B x n x V fp32
    assert prof.activation_bytes["tail"].fixed < 4 * logits + 2 * 8 * 64 * 4 * 4
    assert prof.activation_bytes["trunk"].per_block < prof.block_weight_bytes
    (tmp_path / "folder.json").mkdir()
    with pytest.raises(ValueError, match=r"cannot read .*give a profile"):
        load_profile(tmp_path / "folder.json")
    path = save_profile(prof, tmp_path / "p.json")
    assert load_profile(path) == prof
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ValueError, match="not JSON"):
        load_profile(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"kind": "something"}))
    with pytest.raises(ValueError, match="not a fedsea plan profile"):
        load_profile(tmp_path / "other.json")
    data = prof.to_dict()
    del data["seconds"]["trunk_forward"]
    (tmp_path / "short.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="lacks trunk_forward"):
        load_profile(tmp_path / "short.json")


def test_leakage_is_the_best_attack_at_the_runs_level_and_model(tmp_path):
    rows = [
        {"defence": "none", "head_layers": 2, "relative_sigma": 0.137, "sigma": 0.5, "token_accuracy": 0.9},
        {"defence": "none", "head_layers": 2, "relative_sigma": 0.137, "sigma": 0.5, "token_accuracy": 0.98},
        {"defence": "none", "head_layers": 2, "relative_sigma": 1.1, "sigma": 4.0, "token_accuracy": 0.5},
        {"defence": "nopeek", "head_layers": 4, "relative_sigma": 0.14, "sigma": 1.2, "token_accuracy": 0.7},
        {"defence": "none", "head_layers": 4, "relative_sigma": 0.14, "sigma": 1.2, "token_accuracy": float("nan")},
    ]
    assert best_recovery(rows, NoiseLevel(relative=0.14)) == {2: 0.98}
    assert best_recovery(rows, NoiseLevel(relative=0.14), defence="nopeek") == {4: 0.7}
    assert best_recovery(rows, NoiseLevel(sigma=4.0)) == {2: 0.5}
    assert best_recovery(rows, NoiseLevel(relative=0.5)) == {}
    with pytest.raises(ValueError, match="one of them"):
        NoiseLevel()
    grid = tmp_path / "grid-x.json"
    grid.write_text(json.dumps(rows))
    (tmp_path / "config-x.json").write_text(json.dumps({"model": "smollm2-135m"}))
    assert grid_model(grid) == "smollm2-135m"
    assert len(read_rows([grid], "smollm2-135m")) == 5 and read_rows([grid], "tiny-llama") == []
    (tmp_path / "junk.json").write_text(json.dumps({"a": 1}))
    with pytest.raises(ValueError, match="not an attack grid"):
        read_rows([tmp_path / "junk.json"])
    # The published grids are SmolLM2's, and p = 2 at the default level is among them.
    published = default_grids("smollm2-135m")
    assert published and default_grids("tiny-llama") == []
    assert 2 in best_recovery(read_rows(published, "smollm2-135m"), NoiseLevel(relative=0.14))


def test_a_measured_link_adds_the_runs_emulated_latency_and_clipped_rows_match_clipped_runs():
    from fedsea.federation.plan_run import _link
    from fedsea.federation.simconfig import load_config

    run = load_config(None, ["wire.latency_ms=30", "wire.mbps=100"])
    measured = dataclasses.replace(profile(), link_latency_ms=5.0, link_mbps=50.0)
    assert _link(run, "client-0", measured, {}) == Link(35.0, 50.0)  # emulated on top of the real link
    assert _link(run, "client-0", profile(), {}) == Link(30.0, 100.0)  # nothing measured: the emulation
    assert _link(run, "client-0", measured, {"*": Link(1.0)}) == Link(1.0)  # --link wins
    rows = [
        {"defence": "none", "head_layers": 1, "relative_sigma": 0.14, "clip_norm": None, "token_accuracy": 0.9},
        {"defence": "none", "head_layers": 1, "relative_sigma": 0.14, "clip_norm": 5.0, "token_accuracy": 0.4},
    ]
    assert best_recovery(rows, NoiseLevel(relative=0.14)) == {1: 0.9}
    assert best_recovery(rows, NoiseLevel(relative=0.14), clip_norm=5.0) == {1: 0.4}


def test_near_ties_go_to_the_cut_with_the_least_client_compute():
    # Client and server alike (one machine): every cut's step is within noise of the others.
    flat = profile(client_block=0.02, trunk_block=0.02)
    parties = [Party("client-0", flat, Link(), flat)]
    _, chosen, _ = recommend(parties, all_cuts(L, 4), {}, "sequential", 1)
    assert chosen[0].cut == (1, 1)
    _, chosen, _ = recommend(parties, all_cuts(L, 4), {}, "sequential", 1, tie=0.0)  # no tie: the raw fastest
    assert chosen[0].step_s == min(base_prediction(parties[0], c).step_s for c in all_cuts(L, 4))


def test_cuts_that_do_not_fit_the_profiled_memory_are_left_out():
    prof = profile()
    x11 = base_prediction(Party("c", prof, Link(), prof), (1, 1))
    x12 = base_prediction(Party("c", prof, Link(), prof), (1, 2))
    # The server holds every block, its adapter state for the trunk and the trunk's saved tensors.
    assert x11.server_memory_bytes == 50_000 + L * 10_000 + 4 * 8 * 100 + (100 + 8 * 1000) + 4 * 2 * 4 * 8 * 4
    small = dataclasses.replace(prof, memory_bytes=x11.client_process_bytes)  # room for (1, 1) only
    party = Party("client-0", small, Link(), prof)
    table, chosen, _ = recommend([party], all_cuts(L, 3), {}, "sequential", 1)
    assert [x.cut for x in table["client-0"]] == [(1, 1)] and chosen[0].cut == (1, 1) and x12.cut not in table
    with pytest.raises(ValueError, match="no cut fits the memory profiled"):
        recommend(
            [Party("client-0", prof, Link(), dataclasses.replace(prof, memory_bytes=1))], [(1, 1)], {}, "sequential", 1
        )


def test_a_profile_of_a_few_blocks_plans_the_whole_random_shape():
    from fedsea.federation.plan_run import fit_profile
    from fedsea.federation.simconfig import load_config

    run = load_config(None, ["model.source='random:llama-2-7b'", "lora.dropout=0.0", "wire.compression='none'"])
    few = dataclasses.replace(
        profile(), model="random:llama-2-7b?layers=4", num_layers=4, lora=run.lora.parts().summary()
    )
    fitted = fit_profile(few, run)
    assert (fitted.num_layers, fitted.model) == (32, "random:llama-2-7b") and fitted.seconds == few.seconds
    assert max(p + q for p, q in all_cuts(fitted.num_layers)) == 31
    with pytest.raises(ValueError, match="a profile is of model 'random:llama-2-13b"):
        fit_profile(dataclasses.replace(few, model="random:llama-2-13b?layers=4"), run)
