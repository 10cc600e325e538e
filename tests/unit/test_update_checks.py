"""The checks on every update before it is averaged, the fault count that bans, and robust aggregation."""

from __future__ import annotations

import json

import pytest
import torch

from fedsea.errors import BannedError, InvalidInputError, status_code_name
from fedsea.federation.config import FedConfig
from fedsea.federation.runconfig import FederationSettings
from fedsea.federation.strategy import FedAvg, Median, TrimmedMean, Update, clip_update, make_strategy
from fedsea.federation.validation import FaultBook, check_update, read_records, update_rms
from fedsea.settings import build

START = {"layers.0.q.lora_A.weight": torch.full((4, 8), 0.1), "layers.5.q.lora_B.weight": torch.zeros(8, 4)}


def _honest() -> dict[str, torch.Tensor]:
    """An update of AdamW's size: 10 steps of lr 1e-3 move each element by at most ~1e-2."""
    gen = torch.Generator().manual_seed(0)
    return {k: v + 1e-2 * torch.randn(v.shape, generator=gen).clamp(-1, 1) for k, v in START.items()}


def test_an_honest_update_passes():
    check_update(_honest(), START, "update")
    check_update({k: v.to(torch.bfloat16) for k, v in _honest().items()}, START, "update")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda s: {**s, "layers.0.q.lora_A.weight": torch.zeros(4, 9)},
            r"update\[layers.0.q.lora_A.weight\]: "
            r"expected shape \(4, 8\), got \(4, 9\)",
        ),
        (lambda s: {**s, "layers.9.x": torch.zeros(1)}, r"update\[layers.9.x\]: not a key"),
        (lambda s: {"layers.0.q.lora_A.weight": s["layers.0.q.lora_A.weight"]}, r"layers.5.q.lora_B.weight\]: missing"),
        (lambda s: {**s, "layers.5.q.lora_B.weight": torch.zeros(8, 4, dtype=torch.int32)}, "dtype torch.int32"),
        (lambda s: {**s, "layers.5.q.lora_B.weight": torch.full((8, 4), float("nan"))}, "NaN or Inf"),
        (lambda s: {k: torch.full_like(v, 3e38) for k, v in s.items()}, r"RMS 3e\+38 per element, over the bound 10"),
        (lambda s: {k: torch.full_like(v, 1e6) for k, v in s.items()}, "over the bound"),
        (lambda s: {k: v + 11.0 for k, v in s.items()}, "over the bound"),
    ],
)
def test_a_bad_update_is_refused_naming_the_key_and_the_problem(change, message):
    with pytest.raises(InvalidInputError, match=message) as caught:
        check_update(change(_honest()), START, "update")
    assert status_code_name(caught.value) == "INVALID_ARGUMENT"


def test_the_bound_is_per_element_and_can_be_lifted():
    big = {k: v + 5.0 for k, v in START.items()}  # RMS change 5: under 10, over 1
    check_update(big, START, "update")
    with pytest.raises(InvalidInputError, match="over the bound 1 "):
        check_update(big, START, "update", max_rms=1.0)
    check_update({k: torch.full_like(v, 1e30) for k, v in START.items()}, START, "update", max_rms=None)
    assert update_rms(torch.full((2, 2), 3e38), torch.zeros(2, 2)) == pytest.approx(3e38)  # no float32 overflow
    assert update_rms(torch.zeros(0, 4), torch.zeros(0, 4)) == 0.0


def test_a_long_client_given_key_is_not_echoed_whole():
    with pytest.raises(InvalidInputError) as caught:
        check_update({**START, "x" * 10_000: torch.zeros(1)}, START, "update")
    assert len(str(caught.value)) < 200


def test_faults_ban_after_max_faults():
    book = FaultBook(max_faults=2)
    book.check("a")
    assert book.record("a") is False
    book.check("a")
    assert book.record("a") is True and book.record("a") is False  # banned once
    with pytest.raises(BannedError, match="banned from this run after 3 refused updates") as caught:
        book.check("a")
    assert status_code_name(caught.value) == "PERMISSION_DENIED"
    book.check("b")
    never = FaultBook(max_faults=None)
    assert not any(never.record("a") for _ in range(100))
    with pytest.raises(ValueError, match="max_faults"):
        FaultBook(0)


def _updates(*rows: list[float], weights: tuple[float, ...] | None = None) -> list[Update]:
    weights = weights or (1.0,) * len(rows)
    return [Update(f"c{i}", w, {"w": torch.tensor(r)}) for i, (r, w) in enumerate(zip(rows, weights, strict=True))]


def test_median_and_trimmed_mean_worked_out_by_hand():
    current = {"w": torch.zeros(2), "other": torch.ones(1)}
    odd = _updates([1.0, 10.0], [2.0, -5.0], [1e30, 0.0], weights=(1.0, 1.0, 1e6))
    out = Median().aggregate(odd, current)
    # Per coordinate, ignoring the (client-declared) weights: median(1, 2, 1e30) = 2; median(10, -5, 0) = 0.
    assert torch.equal(out["w"], torch.tensor([2.0, 0.0])) and torch.equal(out["other"], torch.ones(1))
    even = _updates([1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [1e30, 0.0])
    assert torch.equal(Median().aggregate(even, current)["w"], torch.tensor([2.5, 0.0]))  # middle two: (2 + 3) / 2
    five = _updates([1.0], [2.0], [3.0], [4.0], [1e30])
    # trim 0.2 of 5: one cut at each end -> mean(2, 3, 4) = 3.
    assert torch.equal(TrimmedMean(trim_fraction=0.2).aggregate(five, {"w": torch.zeros(1)})["w"], torch.tensor([3.0]))
    # trim 0.1 of 5 cuts nothing (floor(0.5) = 0): the plain mean, unweighted.
    two = _updates([1.0], [3.0], weights=(1.0, 3.0))
    assert torch.equal(TrimmedMean().aggregate(two, {"w": torch.zeros(1)})["w"], torch.tensor([2.0]))
    # At most (n - 1) // 2 cut at each end: one value always stays.
    assert torch.equal(TrimmedMean(trim_fraction=0.49).aggregate(two, {"w": torch.zeros(1)})["w"], torch.tensor([2.0]))
    with pytest.raises(ValueError, match="shapes"):
        Median().aggregate([Update("a", 1, {"w": torch.zeros(2)}), Update("b", 1, {"w": torch.zeros(3)})], current)


def test_clipping_bounds_each_updates_change_and_leaves_small_ones_alone():
    current = {"w": torch.tensor([1.0, 1.0]), "v": torch.zeros(1)}
    big = Update("big", 1, {"w": torch.tensor([4.0, 5.0])})  # change (3, 4): norm 5
    clipped = clip_update(big, current, 1.0)
    assert torch.allclose(clipped.state["w"], torch.tensor([1.6, 1.8]))  # 1 + (3, 4) / 5
    small = Update("small", 1, {"w": torch.tensor([1.1, 1.0])})
    assert clip_update(small, current, 1.0) is small
    # The norm runs over all of an update's tensors together: changes (3, 4) and (12,) -> norm 13.
    both = clip_update(Update("b", 1, {"w": torch.tensor([4.0, 5.0]), "v": torch.tensor([12.0])}), current, 1.3)
    assert torch.allclose(both.state["w"], torch.tensor([1.3, 1.4])) and torch.allclose(
        both.state["v"], torch.tensor([1.2])
    )
    # FedAvg with clipping: the clipped big one and the small one, sample-weighted (1 : 3).
    out = FedAvg(clip_norm=1.0).aggregate([big, Update("s", 3, small.state)], current)
    assert torch.allclose(out["w"], (torch.tensor([1.6, 1.8]) + 3 * torch.tensor([1.1, 1.0])) / 4)


def test_fedavg_is_unchanged_without_clipping():
    updates = _updates([1.0, 2.0], [5.0, 6.0], weights=(1.0, 3.0))
    assert torch.equal(FedAvg().aggregate(updates, {"w": torch.zeros(2)})["w"], torch.tensor([4.0, 5.0]))


def test_settings_reach_the_strategy_and_are_checked():
    strategy = make_strategy("Trimmed-Mean", clip_norm=2.0, trim_fraction=0.25, max_update_rms=None)
    assert isinstance(strategy, TrimmedMean)
    assert (strategy.clip_norm, strategy.trim_fraction, strategy.max_update_rms) == (2.0, 0.25, None)
    assert isinstance(make_strategy("median"), Median)
    # A run file's 0 is "unset" for the optional ones (as for every optional setting).
    given = {"strategy": "median", "clip_norm": 0, "max_update_rms": 0, "max_faults": 0}
    fed = build(FederationSettings, given).fed_config(0, FedConfig().lora)
    assert (fed.strategy, fed.clip_norm, fed.max_update_rms, fed.max_faults) == ("median", None, None, None)
    assert (FedConfig().max_update_rms, FedConfig().max_faults, FedConfig().clip_norm) == (10.0, 3, None)
    for bad in ({"strategy": "krum"}, {"clip_norm": -1.0}, {"trim_fraction": 0.5}, {"max_faults": -1}):
        with pytest.raises(ValueError):
            FedConfig(**bad)  # type: ignore[arg-type]


def test_faults_are_replayed_from_the_round_records_on_resume(tmp_path):
    records = [
        {"round": 1, "refused": {"bad": "update[...]: over the bound", "trunk:group-x": "trunk adapter[...]"}},
        {"round": 2, "refused": {"bad": "update[...]: missing"}},
    ]
    lines = [json.dumps(r) for r in records]
    (tmp_path / "server_rounds.jsonl").write_text("\n".join(lines) + '\n{"round": 3, "refu')  # torn by a kill
    assert read_records(tmp_path) == records and read_records(tmp_path / "none") == []
    book = FaultBook(max_faults=2)
    book.replay(read_records(tmp_path))
    assert book.faults == {"bad": 2} and book.banned == {"bad"}  # a group's adapter is no client's fault


def _coordinator(mode: str = "hierarchical"):  # type: ignore[no-untyped-def]
    import fedsea
    from fedsea.federation.config import FedConfig
    from fedsea.federation.coordinator import Coordinator
    from fedsea.server.trunk import TrunkHost

    async def compute(fn, *args):  # type: ignore[no-untyped-def]  # the servicer's executor, inline
        return fn(*args)

    host = TrunkHost(fedsea.tiny_llama(num_layers=4, hidden_size=32, num_heads=2, num_kv_heads=1, vocab_size=64))
    return Coordinator(host, FedConfig(rounds=1, local_steps=1, mode=mode), None, compute)


def test_a_refusal_after_an_accepted_update_changes_nothing():
    """A second, bad SubmitUpdate from a client whose update was taken neither unseats it nor counts a fault."""
    import asyncio

    from fedsea.federation.coordinator import Member

    coordinator = _coordinator()
    coordinator.members["a"] = Member("a", "s", 1, 0.0)
    coordinator.current, coordinator.allowed = 1, {"a"}
    coordinator.submitted["a"] = Update("a", 1.0, {})
    asyncio.run(coordinator.refuse("a", 1, "update[x]: contains NaN or Inf"))
    assert coordinator.refused == {} and "a" in coordinator.members and "a" in coordinator.allowed


def test_a_session_gone_before_its_trunk_is_loaded_leaves_only_that_client_out():
    """A client whose session closed after the round began (its process exited) is left out; no exception."""
    import asyncio

    from fedsea.federation.coordinator import Member

    coordinator = _coordinator()
    coordinator.members["a"] = Member("a", "no-such-session", 1, 0.0)
    assert asyncio.run(coordinator._load_trunk("a", coordinator.global_state)) is False
    assert "a" in coordinator._gone and "a" not in coordinator.members
