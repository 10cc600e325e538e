"""Run files: defaults, file, overrides, validation, and the resolved file written back."""

from __future__ import annotations

import pytest

import fedsea
from fedsea.federation.simconfig import dump_tree, load_plan


def test_file_then_overrides_then_typed_plan(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text('[task]\nname = "boolq"\n[noise]\nsigma = 0.5\n[[clients]]\nhead_layers = 4\n')
    plan = load_plan(run, ["noise.grad_sigma=1e-4", "noise.grad_clip_norm=0.01", "federation.rounds=2"])
    assert plan.tree["task"]["name"] == "boolq" and plan.fed.rounds == 2
    assert plan.noise == fedsea.NoiseConfig(sigma=0.5)
    assert plan.grad_noise == fedsea.NoiseConfig(sigma=1e-4, clip_norm=0.01)
    assert [c.head_layers for c in plan.clients] == [4, 2, 2]  # one [[clients]] table, the rest defaults
    # The resolved file reads back to the same plan.
    again = tmp_path / "config.toml"
    again.write_text(dump_tree(plan.tree))
    assert load_plan(again) == plan


def test_defaults_send_the_gradient_in_clear():
    plan = load_plan(None)
    assert plan.grad_noise == fedsea.NoiseConfig() and plan.noise == fedsea.NoiseConfig()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["noise.grad_sigma=-1"], "sigma"),
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
