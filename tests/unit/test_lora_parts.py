"""Per-part LoRA in run files: ``[lora.head]``, ``[lora.trunk]``, ``[lora.tail]`` over ``[lora]``."""

from __future__ import annotations

import dataclasses

import pytest

from fedsea.cli.fed import join_settings
from fedsea.cli.main import build_parser
from fedsea.config import LoraSpec, SplitLora
from fedsea.federation.config import FedConfig
from fedsea.federation.simconfig import LoraPart, RunLora, dump_tree, example_run_file, load_config, load_plan
from fedsea.model.adapters import adapter_state_dict
from fedsea.settings import dump_toml, field_docs

TRUNK_16 = "[lora]\nalpha = 32\n[lora.trunk]\nr = 16\n"


def test_a_part_table_overrides_lora_key_by_key(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text(TRUNK_16)
    plan = load_plan(run)
    base = LoraSpec(r=8, alpha=32.0, dropout=0.0)
    assert plan.lora == SplitLora(head=base, trunk=dataclasses.replace(base, r=16), tail=base)
    # The server's FedConfig holds the parts and the one cut every client uses (the default (2, 2)).
    assert plan.fed.lora == plan.lora and plan.fed.cut == plan.lora_cut == (2, 2)
    assert plan.fed.split_lora.trunk == dataclasses.replace(base, r=16)
    # The resolved file keeps the part table and reads back to the same run.
    resolved = dump_tree(plan.tree)
    assert "[lora.trunk]\nr = 16" in resolved and "[lora.head]" not in resolved
    again = tmp_path / "config.toml"
    again.write_text(resolved)
    assert load_config(again) == plan.config
    # A part key can be an override too.
    overridden = load_plan(None, ["lora.head.target_modules=['q_proj']"]).lora
    assert overridden.head.target_modules == ("q_proj",) and overridden.trunk.target_modules == base.target_modules


def test_without_part_tables_the_run_is_as_before():
    plan = load_plan(None)
    spec = LoraSpec(dropout=0.0)
    assert plan.lora == SplitLora.uniform(spec) and plan.lora_cut is None
    # A single LoraSpec in FedConfig, no cut: the server initialises and checks as it always did.
    assert type(plan.fed.lora) is LoraSpec and plan.fed.lora == spec and plan.fed.cut is None
    assert FedConfig(lora=spec).split_lora == SplitLora.uniform(spec)


def test_parts_that_differ_with_mixed_cuts_are_refused_at_load_time(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text(TRUNK_16 + "[[clients]]\nhead_layers = 1\n")
    conflict = r"parts' LoRA differ \(head r=8.*trunk r=16.*different.*\[\(1, 2\), \(2, 2\)\]"
    with pytest.raises(ValueError, match=conflict):
        load_config(run)
    # Mixed cuts are fine when the part tables say what [lora] says.
    run.write_text("[lora.trunk]\nr = 8\n[[clients]]\nhead_layers = 1\n")
    plan = load_plan(run)
    assert plan.lora_cut is None and plan.fed.cut is None and type(plan.fed.lora) is LoraSpec
    # And a FedConfig with different parts needs the cut.
    with pytest.raises(ValueError, match=r"give cut = \(p, q\)"):
        FedConfig(lora=load_plan(None, ["lora.trunk.r=16"]).lora)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("lora.trunk.r=0", "lora.trunk.r must be an integer >= 1"),
        ("lora.tail.dropout=1.5", "lora.tail.dropout must be in"),
        ("lora.trunk.rank=16", "unknown setting 'lora.trunk.rank'"),
    ],
)
def test_bad_part_keys_are_clear_errors(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_join_refuses_a_cut_other_than_the_runs_with_parts_that_differ(tmp_path):
    run = tmp_path / "run.toml"
    run.write_text(TRUNK_16)
    args = build_parser().parse_args(
        ["join", "--server", "x:1", "--run", str(run), "--client", "client-0", "--head-layers", "1"]
    )
    with pytest.raises(ValueError, match=r"every client cuts at \(head_layers, tail_layers\) = \(2, 2\)"):
        join_settings(args)


def test_the_example_shows_the_part_tables_commented_out():
    text = example_run_file()
    for part in ("head", "trunk", "tail"):
        assert f"\n# [lora.{part}]  (unset; keys: r, alpha, dropout, target_modules)" in text


def test_part_tables_round_trip_through_the_commented_dump(tmp_path):
    config = load_config(None, ["lora.trunk.r=16", "lora.head.alpha=4"])
    text = dump_toml(config, comments=True)
    assert "\n[lora.trunk]\n" in text and "\nr = 16\n" in text and "\n# [lora.tail]  (unset" in text
    run = tmp_path / "run.toml"
    run.write_text(text)
    assert load_config(run) == config
    assert all(field_docs(LoraPart).values()) and all(field_docs(RunLora).values())


def test_the_global_model_gives_each_block_its_parts_spec_at_the_runs_cut():
    from fedsea.federation.simulate import global_model

    plan = load_plan(None, ['model.source="tiny-llama"', "lora.trunk.r=16", "client.head_layers=1"])
    assert plan.lora_cut == (1, 2)
    state = {}
    for part in global_model(plan, None).add_lora(plan.lora).parts().values():
        state.update(adapter_state_dict(part))
    merged = global_model(plan, state)  # what export and the evaluation load: every tensor fits
    layers = merged.model.config.num_hidden_layers
    rows = {int(k.split(".")[1]): v.shape[0] for k, v in state.items() if ".lora_A." in k}
    assert rows == {i: 16 if 1 <= i < layers - 2 else 8 for i in range(layers)}
