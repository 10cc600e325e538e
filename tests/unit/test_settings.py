"""The generic settings loader (``fedsea.settings``) and the run file's one config tree."""

from __future__ import annotations

import dataclasses

import pytest

from fedsea.config import LoraSpec, OptimConfig, ServerLimits, SplitConfig, SplitLora, WireConfig
from fedsea.federation.config import FedConfig
from fedsea.federation.simconfig import (
    ClientConfig,
    FederationSettings,
    NoiseSettings,
    RunConfig,
    dump_tree,
    load_config,
    load_plan,
)
from fedsea.privacy.calibration import NoiseTarget
from fedsea.settings import apply_override, build, dump_toml, field_docs, to_tree

# The run file's defaults before the config tree (simconfig.DEFAULTS, written out by the old
# dump_tree, zeros for "none"): a resolved config.toml of an older run, which must still resume.
OLD_DEFAULTS = """
clients = []
[model]
source = "smollm2-135m"
[task]
name = "sst2"
train_split = "train"
train_limit = 300
eval_limit = 100
partition = "iid"
alpha = 0.5
[federation]
clients = 3
rounds = 3
local_steps = 10
mode = "hierarchical"
strategy = "fedavg"
fraction = 1.0
min_clients = 1
round_timeout_s = 600.0
join_timeout_s = 600.0
[client]
head_layers = 2
tail_layers = 2
batch_size = 4
max_length = 128
[lora]
r = 8
alpha = 16.0
dropout = 0.0
target_modules = ["q_proj", "k_proj", "v_proj", "o_proj"]
[optim]
lr = 0.001
weight_decay = 0.01
max_grad_norm = 1.0
[noise]
sigma = 0.0
relative_sigma = 0.14
epsilon = 0.0
delta = 1e-05
clip_norm = 0.0
grad_sigma = 0.0
grad_clip_norm = 0.0
[privacy]
head_regularizer = "none"
regularizer_weight = 1.0
[wire]
dtype = "fp32"
tls = true
latency_ms = 0.0
mbps = 0.0
[run]
seed = 0
"""


def test_an_old_resolved_run_file_loads_to_the_same_settings_as_the_defaults(tmp_path):
    old = tmp_path / "config.toml"
    old.write_text(OLD_DEFAULTS)
    # Its wire says fp32, which the default (auto: the model's dtype) is for the fp32 models of then.
    assert load_config(old) == load_config(None, ["wire.dtype=fp32"])
    assert load_config(None) == RunConfig() and RunConfig().wire.dtype == "auto"
    plan = load_plan(None)
    # The run file's defaults, stated once in RunConfig, are the ones run files always had.
    assert (plan.optim.lr, plan.config.lora.dropout, plan.noise) == (1e-3, 0.0, NoiseTarget(relative_sigma=0.14))
    assert plan.fed == FedConfig(expected_clients=3, lora=LoraSpec(dropout=0.0))
    assert [(c.head_layers, c.tail_layers) for c in plan.clients] == [(2, 2)] * 3
    # The library's own defaults are unchanged for Python users.
    assert (OptimConfig().lr, LoraSpec().dropout) == (1e-4, 0.05)


def test_zero_for_none_in_older_files_reads_as_unset():
    config = load_config(None, ["optim.max_grad_norm=0", "wire.mbps=0", "noise.grad_clip_norm=0", "task.eval_limit=0"])
    assert config.optim.max_grad_norm is None and config.wire.mbps is None
    assert config.noise.grad_clip_norm is None and config.task.eval_limit is None
    assert "mbps" not in to_tree(config)["wire"]  # unset: left out of the resolved file


def test_a_partial_table_keeps_the_other_defaults_of_its_tree():
    config = load_config(None, ["optim.weight_decay=0.1", "lora.r=4"])
    assert config.optim == OptimConfig(lr=1e-3, weight_decay=0.1)  # the run's lr, not OptimConfig's
    assert config.lora.base() == LoraSpec(r=4, dropout=0.0)  # [lora]; no part tables: every part's
    assert config.lora.parts() == SplitLora.uniform(LoraSpec(r=4, dropout=0.0))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"optim": {"lrr": 1}}, r"unknown setting 'optim.lrr'; known: lr, weight_decay, betas, eps, max_grad_norm"),
        ({"nosuch": {}}, "unknown setting 'nosuch'; known: model, task"),
        ({"client": {"head_layers": 1.5}}, "client.head_layers must be an integer, got 1.5"),
        ({"client": {"head_layers": 0}}, "client.head_layers must be an integer >= 1"),
        ({"wire": {"tls": "yes"}}, "wire.tls must be true or false"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules must be a list"),
        ({"optim": {"betas": [0.9]}}, "optim.betas must be a list of 2"),
        ({"task": 3}, "task must be a table"),
        ({"federation": {"min_clients": 4}}, "federation.min_clients"),
        ({"task": {"partition": "random"}}, "task.partition must be one of iid, dirichlet, size"),
        ({"clients": [{"head_layers": 1}] * 4}, r"4 \[\[clients\]\] tables for federation.clients = 3"),
        ({"clients": [{"batch": 1}]}, r"unknown setting 'clients\[0\].batch'"),
    ],
)
def test_bad_values_name_the_setting(data, message):
    with pytest.raises(ValueError, match=message):
        build(RunConfig, data)


def test_overrides_make_tables_and_parse_values_as_toml():
    tree: dict = {}
    assert apply_override(tree, "a.b=[1, 2]") == ["a", "b"]
    apply_override(tree, "a.c=word")
    apply_override(tree, 'd="x=y"')
    assert tree == {"a": {"b": [1, 2], "c": "word"}, "d": "x=y"}
    with pytest.raises(ValueError, match=r"section\.key=value"):
        apply_override(tree, "a..b=1")


def test_a_settings_tree_round_trips_through_toml(tmp_path):
    config = RunConfig(
        federation=FederationSettings(clients=2, mode="sequential"),
        client=ClientConfig(head_layers=3, max_length=64),
        noise=NoiseSettings(relative_sigma=None, epsilon=4.0, clip_norm=10.0),
        wire=dataclasses.replace(RunConfig().wire, dtype="bf16", mbps=100.0),
        limits=ServerLimits(max_batch=8),
    )
    for text in (dump_tree(config), dump_tree(to_tree(config)), dump_toml(config, comments=True)):
        file = tmp_path / "run.toml"
        file.write_text(text)
        assert load_config(file) == config


def test_field_docs_come_from_the_docstrings():
    assert field_docs(SplitConfig)["head_layers"].startswith("p, the blocks on the client before the trunk")
    assert field_docs(WireConfig)["mbps"].startswith("emulated bandwidth")
    docs = field_docs(FederationSettings)  # its own, and FedConfig's for the fields it shares
    assert docs["clients"].startswith("how many clients") and docs["local_steps"].startswith("optimizer steps")
    assert all(docs.values())


def test_yaml_numbers_without_a_dot_load_as_numbers(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3 as a string; run files wrote learning rates that way.
    from fedsea.federation.simconfig import load_plan

    run = tmp_path / "run.yaml"
    run.write_text("optim:\n  lr: 1e-3\nnoise:\n  delta: 1e-5\n")
    plan = load_plan(run)
    assert plan.optim.lr == 1e-3
    assert plan.noise.delta == 1e-5
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim:\n  lr: fast\n")
    with pytest.raises(ValueError, match=r"optim\.lr must be a number"):
        load_plan(bad)
