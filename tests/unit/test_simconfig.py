"""Run files: defaults, file, overrides, validation, and the resolved file written back."""

from __future__ import annotations

import pytest

import fedsea
from fedsea.config import RECOMMENDED_RELATIVE_SIGMA
from fedsea.federation.simconfig import dump_tree, load_plan, releases_per_token
from fedsea.privacy.calibration import NoiseTarget


def test_file_then_overrides_then_typed_plan(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text('[task]\nname = "boolq"\n[noise]\nsigma = 0.5\n[[clients]]\nhead_layers = 4\n')
    plan = load_plan(run, ["noise.grad_sigma=1e-4", "noise.grad_clip_norm=0.01", "federation.rounds=2"])
    assert plan.tree["task"]["name"] == "boolq" and plan.fed.rounds == 2
    assert plan.noise == NoiseTarget(sigma=0.5)  # an explicit sigma replaces the relative default
    assert plan.grad_noise == fedsea.NoiseConfig(sigma=1e-4, clip_norm=0.01)
    assert [c.head_layers for c in plan.clients] == [4, 2, 2]  # one [[clients]] table, the rest defaults
    # The resolved file reads back to the same plan.
    again = tmp_path / "config.toml"
    again.write_text(dump_tree(plan.tree))
    assert load_plan(again) == plan


def test_defaults_send_the_gradient_in_clear_and_noise_h_p_at_the_recommended_level():
    plan = load_plan(None)
    assert plan.grad_noise == fedsea.NoiseConfig()
    assert plan.noise == NoiseTarget(relative_sigma=RECOMMENDED_RELATIVE_SIGMA) and plan.noise.mode == "relative"


@pytest.mark.parametrize(
    ("file", "overrides", "expected"),
    [
        ("[noise]\nsigma = 0\n", [], NoiseTarget(sigma=0.0)),  # noise off, said in the file
        ("", ["noise.sigma=0"], NoiseTarget(sigma=0.0)),  # or on the command line
        ("[noise]\nrelative_sigma = 0.5\n", [], NoiseTarget(relative_sigma=0.5)),
        ("", ["noise.epsilon=8", "noise.clip_norm=40"], NoiseTarget(epsilon=8.0, clip_norm=40.0)),
        (
            "[noise]\nepsilon = 4\ndelta = 1e-6\nclip_norm = 10\n",
            [],
            NoiseTarget(epsilon=4.0, delta=1e-6, clip_norm=10.0),
        ),
        ("[noise]\nclip_norm = 20\n", [], NoiseTarget(relative_sigma=RECOMMENDED_RELATIVE_SIGMA, clip_norm=20.0)),
        # The command line's level wins over the file's: sigma = 0 there turns the noise off.
        ("[noise]\nrelative_sigma = 0.3\n", ["noise.sigma=0"], NoiseTarget(sigma=0.0)),
        ("[noise]\nsigma = 0.5\n", ["noise.relative_sigma=0.2"], NoiseTarget(relative_sigma=0.2)),
    ],
)
def test_noise_level_by_sigma_relative_or_epsilon(tmp_path, file, overrides, expected):
    run = tmp_path / "run.toml"
    run.write_text(file)
    plan = load_plan(run, overrides)
    assert plan.noise == expected
    again = tmp_path / "config.toml"  # the resolved file keeps the level (resumed runs)
    again.write_text(dump_tree(plan.tree))
    assert load_plan(again).noise == expected


def test_head_regularizer_from_the_run_file(tmp_path):
    assert load_plan(None).head_regularizer == "none"
    plan = load_plan(None, ['privacy.head_regularizer="nopeek"', "privacy.regularizer_weight=0.5"])
    assert (plan.head_regularizer, plan.regularizer_weight) == ("nopeek", 0.5)
    again = tmp_path / "config.toml"
    again.write_text(dump_tree(plan.tree))
    assert load_plan(again) == plan


def test_releases_per_token_bound_each_examples_sends():
    assert releases_per_token(rounds=3, local_steps=10, batch_size=4, num_examples=100) == 3
    assert releases_per_token(rounds=3, local_steps=10, batch_size=4, num_examples=30) == 6  # 40 draws of 30
    assert releases_per_token(rounds=2, local_steps=1, batch_size=1, num_examples=0) == 2


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["noise.grad_sigma=-1"], "sigma"),
        (
            ["noise.sigma=0.5", "noise.relative_sigma=0.2"],
            "set one noise level.*noise.relative_sigma = 0.2 and noise.sigma",
        ),
        (["noise.epsilon=8"], "clip_norm must be set"),
        (["noise.relative_sigma=-1"], "relative_sigma must be"),
        (['noise.sigma="loud"'], "noise.sigma must be a number"),
        (['privacy.head_regularizer="dropout"'], "privacy.head_regularizer must be one of none, nopeek"),
        (["privacy.regularizer_weight=-1"], "privacy.regularizer_weight must be"),
        (["noise.bogus=1"], "unknown setting 'noise.bogus'"),
        (["federation"], "section.key=value"),
        (["wire.dtype=int8"], "wire.dtype"),
    ],
)
def test_bad_settings_are_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message):
        load_plan(None, overrides)


def test_yaml_run_file_gives_the_same_plan_as_toml(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('[task]\nname = "rte"\n[noise]\nsigma = 0.25\n[[clients]]\nhead_layers = 3\n')
    yaml = tmp_path / "run.yaml"
    yaml.write_text("task:\n  name: rte\nnoise:\n  sigma: 0.25\nclients:\n  - head_layers: 3\n")
    assert load_plan(yaml) == load_plan(toml)
    bad = tmp_path / "bad.yml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="top level must be a mapping"):
        load_plan(bad)
    unsafe = tmp_path / "unsafe.yaml"
    unsafe.write_text("task: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ValueError, match="cannot read run file"):
        load_plan(unsafe)
