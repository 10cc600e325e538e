"""``fedsea simulate`` (and ``fedsea flower simulate``): a fedsea federation on Flower's Simulation Engine.

The ServerApp starts the trunk server in its process (a thread); the ClientApps run as Flower's
virtual SuperNodes (Ray workers), one per client of the run file. ``fedsea.federation.simulate``
prepares the run folder before and writes the checkpoints' evaluation, ``metrics.jsonl``,
``report.md`` and the plots after, whichever engine ran the rounds.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsea.flower.template import DEFAULT_CONFIG, write_app

if TYPE_CHECKING:
    from fedsea.federation.simconfig import RunPlan


def _start_ray(cpus: int, attempts: int = 3) -> str:
    """Start Ray for Flower's simulation backend, in a folder of its own; retried when it fails to start.

    Why not leave it to Flower: on a busy 2-core machine Ray's node sometimes fails to start
    ("The current node timed out during startup"), and Flower's runtime then stops while its
    ServerApp thread waits out the round's deadline. Started here, a failed start is retried and
    a last failure is an error at once. A fresh temp folder per run keeps a cluster that is
    still shutting down (the previous run's) out of the way.
    """
    import logging
    import tempfile

    import ray

    pythonpath = os.pathsep.join(sys.path)  # the workers import fedsea as this process does
    accel = os.environ.get("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")  # see run_simulation: GPUs stay visible
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        folder = tempfile.mkdtemp(prefix="fedsea-ray-")
        try:
            ray.init(
                num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, _temp_dir=folder,
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": accel}},
            )  # fmt: skip
            return folder
        except Exception as exc:  # Ray raises plain Exceptions for a node that did not start
            last = exc
            ray.shutdown()
            shutil.rmtree(folder, ignore_errors=True)
            logging.getLogger(__name__).warning("Ray did not start (attempt %d of %d): %s", attempt, attempts, exc)
    raise RuntimeError(f"Ray did not start after {attempts} attempts: {last}")


def run_simulation(run_config: dict[str, Any], num_nodes: int, cpus: int | None = None) -> None:
    """Run fedsea's Flower app with ``run_config`` on ``num_nodes`` virtual SuperNodes.

    Flower's public ``run_simulation`` gives the apps an empty run config; the app folder path
    (what ``flwr run`` uses for a local simulation) gives every party the folder's config, so this
    writes one into the run folder and runs Flower's simulation runtime on it.
    """
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline: no usage events
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # The ClientApps' actors ask for no GPU; Ray would then hide the GPUs from them
    # (CUDA_VISIBLE_DEVICES=""), where the native engine's client processes see them: a run file's
    # client device (auto, cuda) means the same on both engines.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    from fedsea.flower.client_app import app as client_app
    from fedsea.flower.server_app import app as server_app

    config = {**DEFAULT_CONFIG, **run_config}
    app_dir = write_app(Path(str(config["run-dir"])) / "app", config, run_file=False)
    # What Flower's run_simulation sets on the Run it makes (one federation, no SuperLink).
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, run.run_id, SUPERLINK_NODE_ID
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config)
    cpus = cpus or os.cpu_count() or 1
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}, "init_args": {"num_cpus": cpus}}
    ray_dir = _start_ray(cpus)  # Flower's backend uses a Ray already started
    try:
        result = _run_simulation(
            num_supernodes=num_nodes,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            client_app=client_app,
            server_app=server_app,
            backend_config=backend,  # type: ignore[arg-type]
            server_app_context=context,
            app_dir=str(app_dir),
            run=run,
            is_app=True,  # the nodes' contexts take the app folder's run config (else an empty one)
        )
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
    if not getattr(result, "success", True):
        raise RuntimeError(f"the Flower simulation failed; see the log above (run folder {config['run-dir']})")


def run_on_flower(
    plan: RunPlan,
    run_dir: Path,
    overrides: list[str],
    resume: bool,
    strategy: str = "",
    secure_aggregation: bool = False,
) -> dict[str, str]:
    """Play the rounds of the run prepared in ``run_dir`` (``prepare_run``) on the Simulation Engine.

    The run file is the run folder's resolved ``config.toml``, ``overrides`` go on top (a
    resume's). This is the Flower half of ``fedsea.federation.simulate.simulate``, which checks the
    plan before, and evaluates and reports after.

    Returns:
        The clients whose ClientApp failed in the last round they were sampled for (name: Flower's
        reason) in a run that finished every round: reported as lost, as the native engine reports
        a client process that died.

    Raises:
        RunStoppedError: the ServerApp stopped (its one-line reason: the trunk server did not
            start, no SuperNode could join, a setting); the run folder keeps what was checkpointed.
    """
    from fedsea.federation.runstate import RunStoppedError
    from fedsea.flower.server_app import FlowerRunError

    run_config = {
        "run-file": str(run_dir / "config.toml"),
        "set": ";".join(overrides),
        "run-dir": str(run_dir),
        "strategy": strategy,
        "resume": resume,
        "secure-aggregation": secure_aggregation,
    }
    limit = getattr(sys, "tracebacklimit", None)
    try:
        run_simulation(run_config, num_nodes=len(plan.clients))
    except FlowerRunError as exc:  # the ServerApp's one line (it ran in a thread of this process)
        raise RunStoppedError(str(exc).removeprefix("fedsea: error: ")) from None
    finally:  # the ServerApp sets it to 0 for its own one-line failure; this process goes on
        if limit is None:
            if hasattr(sys, "tracebacklimit"):
                del sys.tracebacklimit
        else:
            sys.tracebacklimit = limit
    return lost_clients(run_dir)


def lost_clients(run_dir: Path) -> dict[str, str]:
    """Clients whose last sampled round (``server_rounds.jsonl``) failed: name -> Flower's reason."""
    from fedsea.federation.report import read_jsonl

    last: dict[str, str] = {}
    for record in read_jsonl(run_dir / "server_rounds.jsonl"):
        failed = dict(record.get("failed") or {})
        for name in record.get("selected") or []:
            last[str(name)] = str(failed.get(name, ""))
    return {name: f"failed: {why}" for name, why in last.items() if why}


def simulate_on_flower(
    config: str | None,
    overrides: list[str] | tuple[str, ...] = (),
    run_dir: str | None = None,
    strategy: str = "",
    resume: str | None = None,
    centralized: bool = False,
    secure_aggregation: bool = False,
) -> dict[str, Any]:
    """``fedsea flower simulate``: ``fedsea simulate`` on the Flower engine (one code path); returns the summary."""
    from fedsea.federation.simulate import simulate

    return simulate(
        config, overrides, run_dir=run_dir, centralized=centralized, resume=resume, engine="flower",
        strategy=strategy, secure_aggregation=secure_aggregation,
    )  # fmt: skip
