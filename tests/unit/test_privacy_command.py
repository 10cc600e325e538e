"""``fedsea attack`` and its training callbacks, on the tiny model: real fine-tuning, real grid, real CLI."""

from __future__ import annotations

import csv
import json
import random

import pytest
import torch

import fedsea
from fedsea.cli import main
from fedsea.experiments.attack_grid import GridConfig, _mechanism, run_attack_grid
from fedsea.experiments.privacy_utility import UtilityConfig, finetune_utility, finetuned_victim_head
from fedsea.model.adapters import adapter_state_dict
from fedsea.privacy.attacks import TrainConfig, encode_texts, head_states
from fedsea.privacy.shaped import ShapedPrivatizer
from fedsea.tasks import evaluate, get_task, score_choices
from fedsea.tasks.finetune import FinetuneConfig
from fedsea.tasks.runners import ModelRunner, SplitRunner

WORDS = ["the", "movie", "was", "a", "delight", "from", "start", "to", "finish", "plot", "is", "thin", "and", "jokes"]


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 9))) for _ in range(n)]


@pytest.fixture(autouse=True)
def one_thread(monkeypatch):
    monkeypatch.setenv("FEDSEA_NO_PROGRESS", "1")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _grid(**overrides) -> GridConfig:
    base = {"sigmas": (0.0,), "head_layers": (1,), "attacks": ("probe",), "shaped_rank": 8}
    return GridConfig(**{**base, "train": TrainConfig(epochs=1, width=32), **overrides})


CONFIG = UtilityConfig(finetune=FinetuneConfig(steps=3, batch_size=2, lr=1e-3), eval_limit=12)


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _untouched(model: torch.nn.Module, before: dict[str, torch.Tensor]) -> bool:
    after = model.state_dict()
    return after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


def test_finetune_utility_is_cached_and_equals_the_unsplit_evaluation(tiny_model, tiny_tokenizer):
    before = _snapshot(tiny_model)
    utility = finetune_utility(tiny_model, tiny_tokenizer, _grid(), _texts(30, 0), CONFIG)
    value = utility("none", 1, 0.0)
    assert utility("none", 1, 0.0) == value and utility.trainings == 1  # cached: not trained again
    assert 0.0 <= value <= 1.0 and "sst2 accuracy" in utility.name
    run = utility.runs[("none", 1, 0.0)]
    assert len(run.losses) == 3 and all(v.abs().sum() > 0 for k, v in run.adapters["head"].items() if "lora_B" in k)
    assert _untouched(tiny_model, before)  # every setting trains a copy

    # The same adapters, evaluated unsplit with the existing harness, give the same number.
    split = utility.tuner.restore(1, run)
    assert evaluate("sst2", split.model, tiny_tokenizer, limit=12, progress=False).metrics["accuracy"] == value
    # ... because at sigma 0 the noised split scores what the unsplit model scores.
    examples, _ = get_task("sst2").examples("validation", limit=6)
    split.model.eval()
    clean = score_choices(ModelRunner(split.model), tiny_tokenizer, examples, progress=False)
    zero = score_choices(
        SplitRunner(split, privatize=utility.tuner.mechanism("none", 1, 0.0)), tiny_tokenizer, examples
    )
    noisy = score_choices(
        SplitRunner(split, privatize=utility.tuner.mechanism("none", 1, 5.0)), tiny_tokenizer, examples
    )
    assert torch.allclose(torch.tensor(zero), torch.tensor(clean), atol=1e-4)
    assert not torch.allclose(torch.tensor(noisy), torch.tensor(clean), atol=1e-2)

    # Noise is part of training and evaluation: another setting is another run.
    assert 0.0 <= utility("none", 1, 5.0) <= 1.0 and utility.trainings == 2


def test_shaped_utility_uses_the_grids_mechanism(tiny_model, tiny_tokenizer):
    grid, aux = _grid(defences=("shaped",)), _texts(30, 0)
    utility = finetune_utility(tiny_model, tiny_tokenizer, grid, aux, CONFIG)
    mech = utility.tuner.mechanism("shaped", 1, 2.0)
    states = head_states(fedsea.split_model(tiny_model, 1, 1).head, encode_texts(tiny_tokenizer, aux, 32), 2)
    expected = _mechanism("shaped", 2.0, grid, grid.seed + 1, states)
    assert isinstance(mech, ShapedPrivatizer) and isinstance(expected, ShapedPrivatizer)
    assert torch.equal(mech.shape.basis, expected.shape.basis) and mech.config == expected.config
    assert 0.0 <= utility("shaped", 1, 2.0) <= 1.0


def test_finetuned_victim_head_is_private_and_the_attacker_keeps_the_base_head(tiny_model, tiny_tokenizer):
    before = _snapshot(tiny_model)
    heads = finetuned_victim_head(tiny_model, tiny_tokenizer, _grid(), _texts(30, 0), CONFIG)
    nopeek, plain = heads("nopeek", 1), heads("none", 1)
    adapter = {k: v for k, v in nopeek.named_parameters() if "lora_B" in k}
    assert adapter and any(v.abs().sum() > 0 for v in adapter.values())
    assert nopeek.embed_tokens is not plain.embed_tokens  # a fresh model copy per (defence, p)
    plain_adapter = dict(plain.named_parameters())
    assert any(not torch.equal(v, plain_adapter[k]) for k, v in adapter.items())  # the regularizer acted

    ids = torch.tensor([encode_texts(tiny_tokenizer, ["the movie was a delight"], 16)[0]])
    lengths = torch.tensor([ids.shape[1]])
    base_head = fedsea.split_model(tiny_model, 1, 1).head
    with torch.no_grad():
        assert not torch.allclose(nopeek.eval()(ids, lengths), base_head(ids, lengths), atol=1e-5)

    # Through the grid: the victim's head is asked for every defence; the public model stays bare.
    asked = []
    rows = run_attack_grid(
        tiny_model, tiny_tokenizer, _texts(30, 0), _texts(4, 1), _grid(defences=("none", "nopeek")),
        victim_head=lambda d, p, s: asked.append((d, p)) or heads(d, p, s),
    )  # fmt: skip
    assert asked == [("none", 1), ("nopeek", 1)] and len(rows) == 2
    assert _untouched(tiny_model, before) and not any("lora_" in n for n, _ in tiny_model.named_parameters())


def test_utility_victim_head_is_the_head_that_setting_trained(tiny_model, tiny_tokenizer):
    utility = finetune_utility(tiny_model, tiny_tokenizer, _grid(), _texts(30, 0), CONFIG)
    head = utility.victim_head("none", 1, 0.5)
    assert utility.trainings == 1 and ("none", 1, 0.5) in utility.results  # trained (and scored) once
    trained, got = utility.runs[("none", 1, 0.5)].adapters["head"], adapter_state_dict(head)
    assert got.keys() == trained.keys() and all(torch.equal(got[k], trained[k]) for k in got)
    assert any(v.abs().sum() > 0 for k, v in got.items() if "lora_B" in k)  # not the public head
    assert head.embed_tokens is not fedsea.split_model(tiny_model, 1, 1).head.embed_tokens  # a fresh copy
    utility.victim_head("none", 1, 0.5)
    assert utility.trainings == 1


def test_attack_command_end_to_end(tmp_path, capsys):
    out = tmp_path / "grid"
    argv = [
        "attack", "--model", "tiny-llama", "--sigma", "0,2", "--head-layers", "1", "--attacks", "probe",
        "--defence", "none,nopeek", "--aux-texts", "20", "--victim-texts", "4", "--epochs", "1",
        "--probe-width", "32", "--finetune-steps", "2", "--finetune-batch-size", "2", "--eval-limit", "8",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    for name in ("attack_grid.csv", "attack_grid.md", "attack_grid.json", "privacy_utility.png", "attack_config.json"):
        assert (out / name).stat().st_size > 0, name
    with (out / "attack_grid.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["defence"], float(r["sigma"])) for r in rows} == {(d, s) for d in ("none", "nopeek") for s in (0, 2)}
    assert all("sst2 accuracy" in r["utility_name"] and 0 <= float(r["utility"]) <= 1 for r in rows)
    assert len(json.loads((out / "attack_grid.json").read_text())) == 4
    assert f"table: {out / 'attack_grid.md'}" in stdout and f"plot: {out / 'privacy_utility.png'}" in stdout
    assert "| defence |" in stdout and "victim head (nopeek, p=1)" in stdout and "fine-tuned sst2" in stdout


def test_attack_command_perplexity_utility_and_task_victims(tmp_path, capsys):
    argv = ["attack", "--model", "tiny-llama", "--sigma", "1", "--relative", "--head-layers", "2", "--attacks",
            "probe", "--aux-texts", "10", "--victim-texts", "3", "--victim", "task", "--epochs", "1",
            "--probe-width", "16", "--utility", "perplexity", "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (row,) = json.loads((tmp_path / "attack_grid.json").read_text())
    assert "perplexity" in row["utility_name"] and row["relative_sigma"] == pytest.approx(1.0)
    assert "victim: 3 texts (task)" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--sigma", "-1"], "argument --sigma"),
        (["--sigma", "1,x"], "argument --sigma"),
        (["--head-layers", "0"], "argument --head-layers"),
        (["--defence", "none,bogus"], "argument --defence"),
        (["--attacks", ","], "argument --attacks"),
        (["--delta", "2"], "argument --delta"),
        (["--utility", "speed"], "argument --utility"),
        (["--aux-texts", "0"], "argument --aux-texts"),
    ],
)
def test_bad_flags_are_argparse_errors(flags, message, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["attack", "--model", "tiny-llama", *flags])
    assert exc.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--defence", "nopeek", "--victim-head", "base"], "--victim-head finetuned"),
        (["--attacker-head", "victim", "--victim-head", "base"], "--attacker-head victim needs"),
        (["--victim-head", "utility", "--utility", "perplexity"], "--victim-head utility is the head"),
        (["--task", "bogus"], "unknown task 'bogus'"),
        (["--head-layers", "1,3"], "head_layers + tail_layers"),  # tiny-llama has 4 blocks
    ],
)
def test_bad_settings_exit_2_with_a_message(flags, message, tmp_path, capsys):
    assert main(["attack", "--model", "tiny-llama", "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedsea: error:") and message in err
