"""What ``fedsea simulate`` checks before it starts processes, and what it leaves after a failure.

Before any folder or process: every client's (p, q), batch size and length are checked against
the model's number of blocks (read from its config, no weights), so a bad run file is a one-line
error instead of a server that "did not start". On ``--resume`` the latest checkpoint is read and
checked in full (``fedsea.federation.checkpoint.load_round``) before the server is started with
it, and each client's ``steps.jsonl`` loses the step records of rounds after that checkpoint
(the resumed run plays those rounds again and logs them anew: no duplicate steps).

After a failure the run folder is either removed, when this invocation created it and no round
was checkpointed (nothing useful in it), or marked with a ``FAILED`` file holding the reason
(a folder with checkpoints can be resumed; a folder the user gave is never removed). A
successful run or resume deletes ``FAILED``.
"""

from __future__ import annotations

import json
import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from fedsea.errors import FedseaError, InvalidInputError, PartitionError
from fedsea.federation.checkpoint import CheckpointError, latest_round, load_round
from fedsea.federation.report import read_jsonl
from fedsea.io import atomic_write_text

if TYPE_CHECKING:
    from fedsea.federation.simconfig import RunPlan

FAILED_FILE = "FAILED"


class RunStoppedError(FedseaError, RuntimeError):
    """A federated run that stopped before its last round (a lost server, or clients lost too early)."""


def check_plan(plan: RunPlan) -> None:
    """Refuse a run file whose clients cannot run on its model, before anything is started.

    Raises:
        ModelNotFoundError, ModelLoadError, UnsupportedModelError: the model source.
        PartitionError: a client's (p, q), or a cut of its schedule (``cuts``), that does not fit the
            model (p, q >= 1, p + q < L).
        InvalidInputError: a client's batch size or maximum length below 1.
    """
    from fedsea.federation.cuts import check_schedule_model
    from fedsea.model.load import model_num_layers
    from fedsea.model.split import check_partition

    layers = model_num_layers(plan.model)
    for client in plan.clients:
        for name in ("batch_size", "max_length"):
            value = getattr(client, name)
            if value < 1:
                raise InvalidInputError(f"{client.name}.{name}", f"must be >= 1, got {value}")
        try:
            check_partition(layers, client.head_layers, client.tail_layers)
        except PartitionError as exc:
            raise PartitionError(f"{client.name} on {plan.model}: {exc}") from None
        cut = (client.head_layers, client.tail_layers)  # and every cut of its schedule (round 1 defaults to it)
        check_schedule_model(client.cuts, cut, layers, client.name, plan.model)


def completed_round(run_dir: Path) -> int:
    """The last round checkpointed in ``run_dir`` (0: none); its files are checked in full.

    Raises:
        CheckpointError: a broken checkpoint (named, with the problem).
    """
    folder = latest_round(run_dir)
    return 0 if folder is None else load_round(folder)[0]


def drop_unfinished_steps(plan: RunPlan, run_dir: Path, completed: int) -> int:
    """Remove the step records of rounds after ``completed`` (and torn lines) from each client's
    ``steps.jsonl``; return how many went. Traffic records stay: those bytes were moved."""
    dropped = 0
    for client in plan.clients:
        path = run_dir / "clients" / client.name / "steps.jsonl"
        if not path.exists():
            continue
        lines = path.read_text().splitlines()
        records = read_jsonl(path)
        keep = [r for r in records if not ("loss" in r and isinstance(r.get("round"), int) and r["round"] > completed)]
        dropped += len(lines) - len(keep)
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
    return dropped


def exit_reason(code: int) -> str:
    """``-9`` as "killed by SIGKILL", ``1`` as "exit code 1"."""
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def after_failure(run_dir: Path, created: bool, exc: BaseException) -> str:
    """Remove or mark ``run_dir`` after ``exc`` stopped the run; return what became of it, in words."""
    if not run_dir.exists():
        return ""
    try:
        completed = completed_round(run_dir)
    except CheckpointError:
        completed = -1  # something is there: keep it for a look
    if created and completed == 0:
        shutil.rmtree(run_dir, ignore_errors=True)
        return f"removed the half-made run folder {run_dir} (no round was checkpointed)"
    reason = str(exc) or type(exc).__name__
    atomic_write_text(run_dir / FAILED_FILE, reason.splitlines()[0] + "\n" if reason else "\n")
    if completed > 0:
        return f"{run_dir} keeps round {completed}: continue with `fedsea simulate --resume {run_dir}`"
    return f"marked {run_dir / FAILED_FILE}; `fedsea simulate --resume {run_dir}` starts it from round 1"


def clear_failed(run_dir: Path) -> None:
    """Remove the ``FAILED`` mark of a run that has now finished."""
    (run_dir / FAILED_FILE).unlink(missing_ok=True)
