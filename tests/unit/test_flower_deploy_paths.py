"""What the Deployment Engine changes for fedsea's Flower app, without starting Flower: the run
file is found in the installed app folder, and a run nobody can join fails instead of "completing"."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import pytest
from flwr.app import Error, Message

from fedsea.errors import FedseaError
from fedsea.flower.rounds import FlowerRounds
from fedsea.flower.settings import FlowerRun, installed_app_dir
from fedsea.flower.template import write_app


def test_a_relative_run_file_is_the_installed_apps_on_every_machine(tmp_path: Path, monkeypatch) -> None:
    # Flower puts the installed FAB's folder ($FLWR_HOME/apps/...) first on sys.path; the process's
    # own folder is the SuperLink's or SuperNode's, where no run.toml is.
    app = write_app(tmp_path / "apps" / "fedsea.fedsea-federation.1.0.0.abcd1234")
    monkeypatch.chdir(tmp_path)
    assert installed_app_dir() is None
    assert FlowerRun.from_config({"run-file": "run.toml"}).run_file == "run.toml"
    monkeypatch.syspath_prepend(str(tmp_path / "elsewhere"))
    monkeypatch.syspath_prepend(str(app))
    assert installed_app_dir() == app.resolve()
    run = FlowerRun.from_config({"run-file": "run.toml"})
    assert run.run_file == str(app.resolve() / "run.toml")
    run.plan()  # loads from any folder
    assert FlowerRun.from_config({"run-file": "/abs/run.toml"}).run_file == "/abs/run.toml"


class _Grid:
    """A Flower grid whose nodes all fail the query (as a ClientApp with a bad node config does)."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages: Iterable[Message], timeout: float | None = None) -> list[Message]:
        reason = "<class 'ValueError'>:<'node config name 'client-9' is not a client of the run file'>"
        return [Message(Error(code=2, reason=reason), reply_to=m) for m in messages]


def _rounds(grid: _Grid) -> FlowerRounds:
    plan = FlowerRun.from_config({"set": "federation.clients=2"}).plan()
    return FlowerRounds(plan, grid, None, "127.0.0.1:1", 6, None, None, "run")  # type: ignore[arg-type]


def test_a_run_no_supernode_can_join_fails_with_their_reasons(monkeypatch) -> None:
    from flwr.supercore.task_identity import TaskIdentity

    # What a ServerApp process has set before its main runs (messages carry the run's identity).
    for name, value in (("_task_id", 1), ("_run_id", 42), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value)
    with pytest.raises(FedseaError, match=r"no SuperNode could join the run: node .*'client-9' is not a client"):
        _rounds(_Grid([7, 8])).discover(0.1)
    with pytest.raises(FedseaError, match="no SuperNode connected within 0 s"):
        _rounds(_Grid([])).discover(0.1)


def test_a_supernode_takes_its_data_from_the_node_config_else_the_run_file(tmp_path: Path) -> None:
    from fedsea.federation.runconfig import ClientPlan
    from fedsea.flower.client_app import data_source

    own = ClientPlan(name="client-0", data=str(tmp_path / "notes.jsonl"))  # [[clients]] data in the run file
    bare = ClientPlan(name="client-1")
    assert data_source({"data": "/owner/train.jsonl"}, tmp_path, own) == (None, "/owner/train.jsonl", None)
    assert data_source({"shard": "/s.json"}, tmp_path, own) == ("/s.json", None, None)
    assert data_source({}, tmp_path, own) == (None, None, own)  # a Deployment SuperNode: the run file's file
    (tmp_path / "shard.json").write_text("{}")  # a simulation's run folder holds the client's shard
    assert data_source({}, tmp_path, bare) == (str(tmp_path / "shard.json"), None, None)
    with pytest.raises(ValueError, match=r"client-1: no training data: give the node config data=FILE"):
        data_source({}, tmp_path / "elsewhere", bare)
