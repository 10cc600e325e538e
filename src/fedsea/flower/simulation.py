"""``fedsea flower simulate``: a fedsea federation on Flower's Simulation Engine, on this machine.

The ServerApp starts the trunk server in its process; the ClientApps run as Flower's virtual
SuperNodes (Ray workers), one per client of the run file. The run folder then holds the same
checkpoints, logs, ``metrics.jsonl`` and ``report.md`` as a ``fedsea simulate`` run.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

from fedsea.flower.settings import FlowerRun
from fedsea.flower.template import DEFAULT_CONFIG, write_app


def _start_ray(cpus: int, attempts: int = 3) -> str:
    """Start Ray for Flower's simulation backend, in a folder of its own; retried when it fails to start.

    Why not leave it to Flower: on a busy 2-core machine Ray's node sometimes fails to start
    ("The current node timed out during startup"), and Flower's runtime then stops while its
    ServerApp thread waits out the round's deadline. Started here, a failed start is retried and
    a last failure is an error at once. A fresh temp folder per run keeps a cluster that is
    still shutting down (the previous run's) out of the way.
    """
    import logging
    import sys
    import tempfile

    import ray

    pythonpath = os.pathsep.join(sys.path)  # the workers import fedsea as this process does
    last: Exception | None = None
    for attempt in range(1, attempts + 1):
        folder = tempfile.mkdtemp(prefix="fedsea-ray-")
        try:
            ray.init(
                num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING, _temp_dir=folder,
                runtime_env={"env_vars": {"PYTHONPATH": pythonpath}},
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


def simulate_on_flower(
    config: str | None,
    overrides: list[str] | tuple[str, ...] = (),
    run_dir: str | None = None,
    strategy: str = "",
    resume: str | None = None,
    centralized: bool = False,
    secure_aggregation: bool = False,
) -> dict[str, Any]:
    """``fedsea simulate`` on Flower: the run file's clients as virtual SuperNodes; returns the summary."""
    from fedsea.federation.checkpoint import load_round
    from fedsea.federation.report import write_report
    from fedsea.federation.simulate import centralized_baseline, evaluate_state
    from fedsea.model.load import load_tokenizer

    started = time.time()
    if resume:
        folder = Path(resume)
        config = str(folder / "config.toml")
    else:
        if config is None:
            raise ValueError("give a run file, or --resume RUN_DIR")
    plan = FlowerRun(run_file=config, overrides=tuple(overrides)).plan()
    if not resume:
        folder = Path(
            run_dir or f"runs/flower-{plan.config.task.name}-{plan.fed.mode}-{time.strftime('%Y%m%d-%H%M%S')}"
        )
        if (folder / "checkpoints").exists():
            raise ValueError(f"{folder} already holds a run; use --resume {folder} or another --run-dir")
    folder = folder.resolve()
    if secure_aggregation:  # a clear error now rather than a failed ServerApp under Ray
        from fedsea.flower.secagg import check_plan

        check_plan(plan, strategy or plan.fed.strategy.lower())
    run_config = {
        "run-file": str(Path(config).resolve()),
        "set": ";".join(overrides),
        "run-dir": str(folder),
        "strategy": strategy,
        "resume": bool(resume),
        "secure-aggregation": secure_aggregation,
    }
    run_simulation(run_config, num_nodes=len(plan.clients))
    tokenizer = load_tokenizer(plan.model)
    metrics: list[dict[str, Any]] = [{"type": "eval", "round": 0, **evaluate_state(plan, None, tokenizer)}]
    for r in range(1, plan.fed.rounds + 1):
        path = folder / "checkpoints" / f"round-{r:04d}"
        if (path / "state.json").exists():
            _, state, _, _ = load_round(path)
            metrics.append({"type": "eval", "round": r, **evaluate_state(plan, state, tokenizer)})
    central = centralized_baseline(plan, tokenizer) if centralized else None
    return write_report(plan, folder, metrics, central, {"engine": "flower"}, time.time() - started)
