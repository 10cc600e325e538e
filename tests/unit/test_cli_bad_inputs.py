"""Bad command-line inputs end in one line ``fedsea: error: ...`` and exit code 2, never a traceback.

Each case is run in-process through ``fedsea.cli.main.main``; none starts a process or loads
more than the tiny model.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import fedsea
from fedsea.config import LoraSpec
from fedsea.federation.checkpoint import CheckpointError, latest_round, load_round, save_round
from fedsea.federation.simconfig import dump_tree, load_plan
from fedsea.wire.certs import make_test_certs

RUN = """
[model]
source = "tiny-llama"
[task]
name = "sst2"
train_limit = 8
eval_limit = 4
[federation]
clients = 2
rounds = 3
local_steps = 1
[client]
head_layers = 1
tail_layers = 1
batch_size = 2
max_length = 32
"""
SPLIT = ["--model", "tiny-llama", "--head-layers", "1", "--tail-layers", "1"]


def one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *needles: str) -> str:
    """Run ``fedsea argv``: exit code 2 and one ``fedsea: error:`` line naming each needle."""
    from fedsea.cli.main import main

    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fedsea: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.fixture
def adapters(tmp_path: Path) -> Path:
    """head/, trunk/ and tail/ adapters of the tiny model at (1, 1)."""
    folder = tmp_path / "adapters"
    fedsea.split_model(fedsea.tiny_llama(), 1, 1).add_lora(LoraSpec(r=2)).save_adapters(folder)
    return folder


def _corrupt_safetensors(path: Path) -> None:
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage")


@pytest.mark.parametrize("command", ["generate", "merge", "eval"])
def test_a_corrupt_adapter_file_is_named(tmp_path, capsys, adapters, command):
    _corrupt_safetensors(adapters / "trunk" / "adapter_model.safetensors")
    argv = {
        "generate": ["generate", "--server", "127.0.0.1:1", *SPLIT, "--prompt", "hi", "--adapters", str(adapters)],
        "merge": ["merge", str(adapters), str(tmp_path / "out"), *SPLIT],
        "eval": ["eval", "--task", "copa", "--model", "tiny-llama", "--limit", "1", "--adapter", str(adapters)],
    }[command]
    one_line_error(capsys, argv, "adapter_model.safetensors", "not a readable safetensors file")


def test_a_corrupt_model_file_is_named(tmp_path, capsys):
    folder = tmp_path / "model"
    fedsea.tiny_llama().save_pretrained(folder)
    _corrupt_safetensors(folder / "model.safetensors")
    one_line_error(capsys, ["info", str(folder)], "cannot load the model", str(folder))


def test_generate_refuses_adapters_without_a_trunk_unless_told(capsys, adapters):
    shutil.rmtree(adapters / "trunk")
    argv = ["generate", "--server", "127.0.0.1:1", *SPLIT, "--prompt", "hi", "--adapters", str(adapters)]
    # The bug: the base trunk was used without a word (exit 0 against a live server).
    one_line_error(capsys, argv, "no trunk/", "--base-trunk")
    # Told so, it goes on to connect (and meets no server here).
    one_line_error(capsys, [*argv, "--base-trunk"], "UNAVAILABLE")


@pytest.mark.parametrize("flag", ["--batch-size", "--micro-batches", "--epochs", "--max-length"])
def test_train_refuses_counts_below_one(tmp_path, capsys, flag):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "hello world"}\n')
    argv = ["train", "--server", "127.0.0.1:1", *SPLIT, "--data", str(data), flag, "0"]
    one_line_error(capsys, argv, flag, ">= 1")


@pytest.fixture
def certs(tmp_path: Path) -> tuple[Path, Path]:
    paths = make_test_certs(tmp_path / "certs")
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    return paths.server_key, junk


@pytest.mark.parametrize("which", ["cert", "key", "client-ca", "mismatched-key"])
def test_serve_names_a_bad_tls_file(tmp_path, capsys, certs, which):
    paths = make_test_certs(tmp_path / "c")
    given = {"cert": paths.server_cert, "key": paths.server_key, "client-ca": paths.ca_cert}
    junk = certs[1]
    if which == "mismatched-key":
        given["key"] = paths.client_key
    else:
        given[which] = junk
    argv = ["serve", "--model", "tiny-llama", "--port", "0", "--tls-cert", str(given["cert"])]
    argv += ["--tls-key", str(given["key"]), "--tls-client-ca", str(given["client-ca"])]
    flag = "--tls-key" if which == "mismatched-key" else f"--tls-{which}"
    one_line_error(capsys, argv, flag)


@pytest.mark.parametrize("which", ["ca", "cert", "key"])
def test_client_commands_name_a_bad_tls_file(tmp_path, capsys, certs, which):
    paths = make_test_certs(tmp_path / "c")
    given = {"ca": paths.ca_cert, "cert": paths.client_cert, "key": paths.client_key}
    given[which] = certs[1]
    argv = ["generate", "--server", "127.0.0.1:1", *SPLIT, "--prompt", "hi"]
    argv += [x for k, v in given.items() for x in (f"--tls-{k}", str(v))]
    one_line_error(capsys, argv, f"--tls-{which}", str(certs[1]))


# -- checkpoints --------------------------------------------------------------------------------


def _rng(state: Path) -> None:
    data = json.loads(state.read_text())
    data["torch_rng"] = [1, 2, 3]
    state.write_text(json.dumps(data))


def _field(key: str, value: object) -> Callable[[Path], None]:
    def change(state: Path) -> None:
        data = json.loads(state.read_text())
        data[key] = value
        state.write_text(json.dumps(data))

    return change


# name: (what to do to checkpoints/, what the error names)
BROKEN: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated global": (
        lambda c: (c / "round-0002/global.safetensors").write_bytes(
            (c / "round-0002/global.safetensors").read_bytes()[:40]
        ),
        "global.safetensors",
    ),
    "missing state.json": (lambda c: (c / "round-0002/state.json").unlink(), "state.json does not exist"),
    "state.json not JSON": (lambda c: (c / "round-0002/state.json").write_text("{oops"), "is not JSON"),
    "state.json empty object": (lambda c: (c / "round-0002/state.json").write_text("{}"), "'round'"),
    "state.json wrong round type": (lambda c: _field("round", "two")(c / "round-0002/state.json"), "'round'"),
    "state.json round of another folder": (lambda c: _field("round", 7)(c / "round-0002/state.json"), "folder"),
    "corrupt RNG state": (lambda c: _rng(c / "round-0002/state.json"), "torch_rng"),
    "corrupt optimizer file": (lambda c: _corrupt_safetensors(c / "round-0002/optim-adam.safetensors"), "optim-adam"),
    "LATEST garbage": (lambda c: (c / "LATEST").write_bytes(b"\x00\xff../../etc"), "LATEST"),
    "LATEST names a missing round": (lambda c: (c / "LATEST").write_text("round-0009"), "round-0009"),
}


@pytest.fixture
def run_folder(tmp_path: Path) -> Path:
    """A run folder with the tiny run file and two round checkpoints (as ``fedsea serve --run`` writes)."""
    folder = tmp_path / "run"
    (tmp_path / "run.toml").write_text(RUN)
    folder.mkdir()
    (folder / "config.toml").write_text(dump_tree(load_plan(tmp_path / "run.toml").tree))
    weight = torch.nn.Parameter(torch.ones(2))
    optim = torch.optim.Adam([weight])
    weight.grad = torch.ones(2)
    optim.step()
    for r in (1, 2):
        save_round(folder, r, {"a": torch.ones(2)}, {"adam": optim.state_dict()})
    assert load_round(latest_round(folder))[0] == 2  # intact, it loads
    return folder


@pytest.mark.parametrize("broken", list(BROKEN))
def test_a_broken_checkpoint_is_refused_with_the_file_and_the_reason(capsys, run_folder, broken):
    change, needle = BROKEN[broken]
    change(run_folder / "checkpoints")
    with pytest.raises(CheckpointError, match=needle.replace("(", r"\(")):
        load_round(latest_round(run_folder) or run_folder)
    # Every command that reads it refuses it, before any model or process is started.
    out = str(run_folder.parent / "merged")
    one_line_error(capsys, ["export", str(run_folder), out], needle)
    assert not Path(out).exists()
    one_line_error(capsys, ["simulate", "--resume", str(run_folder)], needle)
    serve = ["serve", "--model", "tiny-llama", "--port", "0", "--run", str(run_folder / "config.toml")]
    one_line_error(capsys, [*serve, "--run-dir", str(run_folder), "--resume"], needle)
    assert not (run_folder / "FAILED").exists()  # the user's run folder is left as it was


def test_no_checkpoint_yet_is_not_an_error_to_resume_from(run_folder):
    shutil.rmtree(run_folder / "checkpoints")
    assert latest_round(run_folder) is None


# -- simulate: refused before any folder or process ---------------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ('model.source="/no/such/model"', "no model at"),
        ("client.head_layers=2", "client-0 on tiny-llama"),  # p + q = 3 ... with tail 2 below
        ("client.tail_layers=3", "trunk keeps at least one"),
    ],
)
def test_simulate_refuses_a_run_that_cannot_start_and_makes_no_folder(tmp_path, capsys, override, needle):
    (tmp_path / "run.toml").write_text(RUN)
    run_dir = tmp_path / "out"
    extra = ["client.tail_layers=2"] if override.startswith("client.head") else []
    argv = ["simulate", str(tmp_path / "run.toml"), override, *extra, "--run-dir", str(run_dir)]
    one_line_error(capsys, argv, needle)
    assert not run_dir.exists()


def test_simulate_checks_each_clients_own_split(tmp_path, capsys):
    (tmp_path / "run.toml").write_text(RUN + "[[clients]]\n[[clients]]\nhead_layers = 3\n")
    argv = ["simulate", str(tmp_path / "run.toml"), "--run-dir", str(tmp_path / "out")]
    one_line_error(capsys, argv, "client-1", "3 + 1 = 4")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ['{"a": 1}', '{"task": "sst2", "split": "train"}', "[1, 2]"])
def test_join_names_a_shard_that_is_not_one(tmp_path, capsys, run_folder, content):
    shard = tmp_path / "shard.json"
    shard.write_text(content)
    argv = ["join", "--server", "127.0.0.1:1", "--run", str(run_folder / "config.toml"), "--client", "client-0"]
    one_line_error(capsys, [*argv, "--shard", str(shard)], str(shard))
