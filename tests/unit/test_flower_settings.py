"""The Flower app's run config, record slices and app template (no Flower run needed)."""

from __future__ import annotations

import tomllib

import pytest
import torch

from fedsea.flower.records import head_tail_slice, to_record, to_state
from fedsea.flower.settings import FlowerRun
from fedsea.flower.template import DEFAULT_CONFIG, write_app


def test_run_config_keys_become_run_file_overrides():
    run = FlowerRun.from_config(
        {"fedsea.federation.rounds": 5, "set": "federation.local_steps=7; lora.r=4", "strategy": "FedAdam"}
    )
    plan = run.plan()
    assert plan.fed.rounds == 5 and plan.fed.local_steps == 7 and plan.lora.head.r == 4
    assert run.strategy_name(plan) == "fedadam"
    assert FlowerRun.from_config({}).strategy_name(plan) == plan.fed.strategy


def test_an_unknown_key_or_strategy_is_an_error_naming_it():
    with pytest.raises(ValueError, match="unknown run-config key 'rounds'"):
        FlowerRun.from_config({"rounds": 3})
    with pytest.raises(ValueError, match="strategy must be one of"):
        FlowerRun.from_config({"strategy": "krum"})
    with pytest.raises(ValueError, match="federation"):
        FlowerRun.from_config({"fedsea.federation.no_such_key": 1}).plan()


def test_a_client_gets_the_tensors_of_its_head_and_tail_blocks_only():
    state = {f"layers.{n}.self_attn.q_proj.lora_A.weight": torch.full((2, 2), float(n)) for n in range(6)}
    got = head_tail_slice(state, 6, head=2, tail=1)
    assert sorted(int(k.split(".")[1]) for k in got) == [0, 1, 5]
    back = to_state(to_record(got))
    assert back.keys() == got.keys() and all(torch.equal(back[k], got[k]) for k in got)


def test_the_app_template_declares_the_apps_and_every_run_config_key(tmp_path):
    folder = write_app(tmp_path / "app")
    project = tomllib.loads((folder / "pyproject.toml").read_text())
    app = project["tool"]["flwr"]["app"]
    assert app["components"] == {
        "serverapp": "fedsea.flower.server_app:app",
        "clientapp": "fedsea.flower.client_app:app",
    }
    assert app["config"] == DEFAULT_CONFIG
    assert (folder / "run.toml").is_file()
    FlowerRun.from_config(app["config"], app_dir=folder).plan()  # the template's run file loads as it is


def test_the_serverapp_reports_by_default_and_evaluate_is_checked():
    run = FlowerRun.from_config({})
    assert run.report and run.evaluate == "rounds"  # a deployment run's folder gets its report
    assert FlowerRun.from_config({"report": False, "evaluate": "LAST"}) == FlowerRun(report=False, evaluate="last")
    with pytest.raises(ValueError, match="evaluate must be one of rounds, last, none"):
        FlowerRun.from_config({"evaluate": "sometimes"})
    assert DEFAULT_CONFIG["report"] is True and DEFAULT_CONFIG["evaluate"] == "rounds"  # flwr run can override them
