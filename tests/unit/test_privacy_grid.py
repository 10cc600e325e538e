"""The attack grid: rows for every (defence, p, sigma, attack), a table and a privacy-utility plot."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

import fedsea
from fedsea.experiments.attack_grid import GridConfig, run_attack_grid
from fedsea.experiments.privacy_report import best_attacks, markdown_table
from fedsea.privacy.attacks import TrainConfig

WORDS = [
    "the",
    "movie",
    "was",
    "a",
    "delight",
    "from",
    "start",
    "to",
    "finish",
    "plot",
    "is",
    "thin",
    "and",
    "jokes",
    "fall",
    "flat",
    "bank",
    "council",
    "park",
    "river",
]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(n)]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _config(**overrides):
    base = {
        "sigmas": (0.0, 3.0),
        "relative": True,
        "head_layers": (1, 2),
        "defences": ("none", "shaped"),
        "attacks": ("probe",),
        "clip_norm": 20.0,
        "releases": 2,
        "shaped_rank": 8,
        "train": TrainConfig(epochs=2, width=64, batch_size=32),
    }
    return GridConfig(**{**base, **overrides})


def test_grid_rows_table_and_plot(tmp_path, tiny_tokenizer):
    model = fedsea.tiny_llama(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)
    lines = []
    rows = run_attack_grid(model, tiny_tokenizer, _texts(60, 0), _texts(6, 1), _config(), tmp_path, log=lines.append)
    assert len(rows) == 2 * 2 * 2 * 1  # p x defences x sigmas x attacks
    assert {(r.defence, r.head_layers) for r in rows} == {(d, p) for d in ("none", "shaped") for p in (1, 2)}
    for r in rows:
        assert 0 <= r.token_accuracy <= 1 and 0 <= r.rouge_l <= 1 and 0 <= r.exact <= 1
        assert r.epsilon is not None and (r.epsilon == float("inf")) == (r.sigma == 0)
        assert r.utility > 1 and "perplexity" in r.utility_name
    # Shaped noise puts more power in some directions and less in others: its worst-case epsilon is larger.
    eps = {(r.defence, r.head_layers): r.epsilon for r in rows if r.sigma > 0}
    assert eps[("shaped", 1)] > eps[("none", 1)]
    assert len(best_attacks(rows)) == 8 and "| defence |" in markdown_table(rows)
    for name in ("attack_grid.csv", "attack_grid.md", "attack_grid.json", "privacy_utility.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    with (tmp_path / "attack_grid.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert len(json.loads((tmp_path / "attack_grid.json").read_text())) == len(rows)
    assert any("p=1" in line for line in lines)


def test_grid_uses_the_callers_utility_and_victim_head(tiny_tokenizer):
    model = fedsea.tiny_llama(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512)
    other = fedsea.tiny_llama(num_layers=6, hidden_size=64, num_heads=4, num_kv_heads=2, vocab_size=512, seed=1)
    asked = []

    def victim_head(defence, p, sigma):
        asked.append((defence, p, sigma))
        return fedsea.split_model(other, p, 1).head

    # bisr without probe in the list: it fits its own probe first.
    config = _config(head_layers=(1,), defences=("none", "nopeek"), sigmas=(0.0,), attacks=("bisr",))
    rows = run_attack_grid(
        model, tiny_tokenizer, _texts(40, 0), _texts(4, 1), config,
        victim_head=victim_head, utility=lambda d, p, s: 0.5, utility_name="accuracy",
    )  # fmt: skip
    assert asked == [("none", 1, 0.0), ("nopeek", 1, 0.0)]  # asked per setting
    assert all(r.utility == 0.5 and r.utility_name == "accuracy" and r.attack == "bisr" for r in rows)
    with pytest.raises(ValueError, match="victim_head"):
        run_attack_grid(model, tiny_tokenizer, _texts(4, 0), _texts(4, 1), config)


@pytest.mark.parametrize(
    ("overrides", "field"),
    [({"defences": ("bogus",)}, "defences"), ({"attacks": ()}, "attacks"), ({"sigmas": (-1.0,)}, "sigmas")],
)
def test_grid_config_validation(overrides, field):
    with pytest.raises(ValueError, match=field):
        _config(**overrides)


def test_an_attacker_who_knows_the_victims_head_trains_on_it(tiny_tokenizer):
    """A FedAvg server receives head adapters: attacked with the victim's own head, a private
    head stops protecting; attacked with the public head, it looks safer than it is."""
    model, victim_model = fedsea.tiny_llama(num_layers=4, seed=0), fedsea.tiny_llama(num_layers=4, seed=0)
    # The victim's "private" first block: other weights, same public embedding.
    victim_model.model.layers[0].load_state_dict(fedsea.tiny_llama(num_layers=4, seed=7).model.layers[0].state_dict())
    with torch.no_grad():  # a token-dominated h_1 (see PRIVACY.md on the tiny model): probes can peak
        for m in (model, victim_model):
            m.model.embed_tokens.weight.mul_(3.0)
    victim_head = fedsea.split_model(victim_model, 1, 1).head
    grid = GridConfig(
        sigmas=(0.0,), head_layers=(1,), attacks=("probe",), attacker_heads=("base", "victim"),
        train=TrainConfig(epochs=8, width=256, batch_size=64),
    )  # fmt: skip
    rows = run_attack_grid(
        model, tiny_tokenizer, _texts(400, 0), _texts(8, 1), grid, victim_head=lambda d, p, s: victim_head
    )
    by_head = {r.attacker_head: r for r in rows}
    assert sorted(by_head) == ["base", "victim"] and len(rows) == 2
    assert by_head["victim"].token_accuracy > 0.9
    assert by_head["victim"].token_accuracy > by_head["base"].token_accuracy + 0.2
    assert best_attacks(rows) == [by_head["victim"]]  # the owner's privacy is the worst case
    assert "| victim |" in markdown_table(rows)
    with pytest.raises(ValueError, match="attacker_heads 'victim' needs victim_head"):
        run_attack_grid(model, tiny_tokenizer, _texts(10, 0), _texts(2, 1), grid)
    with pytest.raises(ValueError, match="attacker_heads"):
        GridConfig(attacker_heads=("server",))


def test_grids_of_several_runs_merge_into_one_table_and_picture(tmp_path, capsys):
    from fedsea.cli import main
    from fedsea.experiments.attack_grid import GridRow
    from fedsea.experiments.privacy_report import write_report

    def row(sigma, acc, utility):
        return GridRow(
            "none", 2, sigma, sigma / 3.65, None, None, "probe", acc, acc, 0.0, utility, "sst2 accuracy", 1.0
        )

    write_report([row(0.0, 0.95, 0.85), row(4.0, 0.6, 0.56)], tmp_path / "a")
    write_report([row(4.0, 0.55, 0.8)], tmp_path / "b")
    grid_a, grid_b = tmp_path / "a" / "attack_grid.json", tmp_path / "b" / "attack_grid.json"
    assert main(["attack-report", str(grid_a), f"{grid_b}=200 steps", "--out", str(tmp_path / "all")]) == 0
    merged = json.loads((tmp_path / "all" / "attack_grid.json").read_text())
    assert [(r["defence"], r["sigma"]) for r in merged] == [("none", 0.0), ("none", 4.0), ("none (200 steps)", 4.0)]
    assert (tmp_path / "all" / "privacy_utility.png").stat().st_size > 0
    assert "3 rows" in capsys.readouterr().out
