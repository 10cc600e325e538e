"""``--resume`` with overrides: what the checkpoints were made with is refused, the rest applied and said."""

from __future__ import annotations

import pytest

from fedsea.federation.simconfig import dump_tree, load_plan
from fedsea.federation.simulate import open_run
from tests.unit.test_cli_bad_inputs import RUN


@pytest.fixture
def run_folder(tmp_path):
    run_file = tmp_path / "run.toml"
    run_file.write_text(RUN)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.toml").write_text(dump_tree(load_plan(run_file).tree))
    return folder


def test_an_override_that_changes_the_run_is_refused_and_nothing_changes(run_folder):
    before = (run_folder / "config.toml").read_text()
    with pytest.raises(ValueError, match=r"task\.name \('sst2' -> 'rte'\) would change the run"):
        open_run(None, ['task.name="rte"', "federation.rounds=5"], None, str(run_folder))
    assert (run_folder / "config.toml").read_text() == before


def test_more_rounds_and_longer_timeouts_are_applied_and_said(run_folder, capsys):
    plan, _ = open_run(None, ["federation.rounds=5", "federation.round_timeout_s=900"], None, str(run_folder))
    assert plan.fed.rounds == 5
    saved = load_plan(run_folder / "config.toml")
    assert saved.fed.rounds == 5 and saved.config.federation.round_timeout_s == 900
    note = capsys.readouterr().err
    assert "--resume applies" in note and "federation.rounds = 5 (was 3)" in note and "round_timeout_s = 900" in note


def test_a_resume_without_overrides_leaves_the_run_file_alone(run_folder, capsys):
    before = (run_folder / "config.toml").read_text()
    open_run(None, [], None, str(run_folder))
    assert (run_folder / "config.toml").read_text() == before and capsys.readouterr().err == ""
