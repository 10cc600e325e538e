"""``fedsea simulate``: federations on one machine, on Flower's Simulation Engine (one orchestration).

The rounds run on Flower's Simulation Engine (``run_on_flower``: the same ServerApp and
ClientApp as ``flwr run``; the ServerApp starts the trunk server in this process, the ClientApps
run as virtual SuperNodes, Ray workers, one per client of the run file). fedsea's native
coordinator (``fedsea.federation.native``) runs a run when asked (``engine="native"``): it is
the reference the Flower runs are tested against. Both go through one pipeline
(``fedsea.federation.simulate.run_and_report``): the same checks,
run folder, ``--resume``, ``metrics.jsonl``, ``report.md``, plots and summary.
``simulate`` is ``fedsea simulate``; ``simulate_on_flower`` is ``fedsea flower simulate``
(``engine="flower"``).
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedsea.flower.runlog import lost_clients
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
        "report": False,  # run_and_report evaluates and reports, here, after the engine
    }
    limit = getattr(sys, "tracebacklimit", None)
    try:
        run_simulation(run_config, num_nodes=len(plan.clients), cpus=_cpus(plan))
    except FlowerRunError as exc:  # the ServerApp's one line (it ran in a thread of this process)
        raise RunStoppedError(str(exc).removeprefix("fedsea: error: ")) from None
    finally:  # the ServerApp sets it to 0 for its own one-line failure; this process goes on
        if limit is None:
            if hasattr(sys, "tracebacklimit"):
                del sys.tracebacklimit
        else:
            sys.tracebacklimit = limit
    return lost_clients(run_dir)


def _cpus(plan: RunPlan) -> int:
    """Ray's CPUs for ``plan``: this machine's, and in client-batch mode at least a round's clients.

    Each ClientApp actor asks for one CPU, so Ray runs as many at once as it has CPUs. A
    client-batch group's steps wait for every member: all the clients a round samples must train
    at the same time, or the group would go on without those still queued once a step's timeout
    runs out. Ray's CPUs are a count of slots, not cores: more slots than cores is allowed.
    """
    cpus = os.cpu_count() or 1
    if plan.fed.mode != "client-batch":
        return cpus
    from fedsea.federation.strategy import make_strategy

    sampler = make_strategy("fedavg", plan.fed.fraction, plan.fed.min_clients)
    names = [c.name for c in plan.clients]
    return max(cpus, len(sampler.select(names, 1, plan.fed.seed)))  # every round samples as many


ENGINES = ("auto", "flower", "native")


def run_engine(run_dir: Path) -> str | None:
    """The engine the run in ``run_dir`` ran on: its ``engine`` file, else its rounds' records (a
    record without ``engine`` is the native coordinator's); None for a run without either."""
    from fedsea.federation.report import read_jsonl
    from fedsea.federation.simulate import ENGINE_FILE

    path = run_dir / ENGINE_FILE
    if path.is_file():
        return path.read_text().strip() or None
    rounds = run_dir / "server_rounds.jsonl"
    records = read_jsonl(rounds) if rounds.exists() else []
    return str(records[-1].get("engine", "native")) if records else None


def pick_engine(plan: RunPlan, engine: str = "auto") -> str:
    """The engine that runs ``plan``: ``"flower"`` (``auto`` or ``flower``) or ``"native"``.

    Every mode runs on both; the native coordinator (``fedsea serve --run`` and ``fedsea join``
    processes) is kept as the reference the Flower runs are tested against.

    Raises:
        ValueError: an unknown engine, or ``native`` for a run whose ``cuts`` move a client's cut.
    """
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if engine == "native":  # the fixed-cut reference: a cut schedule (``cuts``) runs on Flower only
        from fedsea.federation.cuts import refuse_moving_cuts

        refuse_moving_cuts(plan.clients, "the native engine (--engine native)")
    return "native" if engine == "native" else "flower"


def simulate(
    config: str | None,
    overrides: list[str] | tuple[str, ...] = (),
    run_dir: str | None = None,
    centralized: bool = False,
    resume: str | None = None,
    progress: bool = True,
    eval_every_round: bool = True,
    engine: str = "auto",
    strategy: str = "",
    secure_aggregation: bool = False,
) -> dict[str, Any]:
    """Run a federated simulation end to end; returns a summary (also in ``run_dir/report.md``).

    Args:
        config: the run file (TOML); None with ``resume`` (the run folder's ``config.toml``).
        overrides: ``section.key=value`` settings over the run file.
        run_dir: the run folder (default ``runs/<task>-<mode>-<time>``).
        centralized: also train the unsplit model on the union of the data, same budget.
        resume: continue the run in this folder from its last checkpoint; with ``engine="auto"``
            on the engine it ran on (``run_engine``).
        progress: print the partition (and the native coordinator's round bar).
        eval_every_round: False evaluates the base model and the last round only (benchmarks).
        engine: ``auto`` or ``flower`` (Flower's Simulation Engine), or ``native`` (``pick_engine``).
        strategy: the Flower strategy (``fedavg``, ``fedadam``, ``median``, ``trimmed-mean``);
            empty: the run file's ``federation.strategy``. Flower only.
        secure_aggregation: SecAgg+ over the head/tail adapters (``fedsea.flower.secagg``). Flower only.

    The summary's ``engine`` names the engine that played the rounds.
    """
    from fedsea.federation.native import run_processes
    from fedsea.federation.simulate import open_run, run_and_report

    plan, folder = open_run(config, overrides, run_dir, resume)
    if resume and engine == "auto":
        engine = run_engine(folder) or engine  # a run goes on with the engine it started on
    chosen = pick_engine(plan, engine)
    if chosen == "native" and (strategy or secure_aggregation):
        raise ValueError("--strategy and --secure-aggregation are Flower's: drop them, or drop --engine native")
    if secure_aggregation:  # a clear error now rather than a failed ServerApp
        from fedsea.flower.secagg import check_plan

        check_plan(plan, strategy or plan.fed.strategy.lower())

    def play(plan: RunPlan, folder: Path, overrides: list[str], resume: bool) -> dict[str, str]:
        if chosen == "native":
            return run_processes(plan, folder, resume=resume, progress=progress)
        return run_on_flower(plan, folder, overrides, resume, strategy, secure_aggregation)

    return run_and_report(plan, folder, play, chosen, overrides, bool(resume), centralized, progress,
                          eval_every_round)  # fmt: skip


def simulate_on_flower(
    config: str | None,
    overrides: list[str] | tuple[str, ...] = (),
    run_dir: str | None = None,
    strategy: str = "",
    resume: str | None = None,
    centralized: bool = False,
    secure_aggregation: bool = False,
    progress: bool = True,
    eval_every_round: bool = True,
) -> dict[str, Any]:
    """``fedsea flower simulate``: ``simulate`` with ``engine="flower"`` (one code path); returns the summary."""
    return simulate(
        config, overrides, run_dir=run_dir, centralized=centralized, resume=resume, progress=progress,
        eval_every_round=eval_every_round, engine="flower", strategy=strategy, secure_aggregation=secure_aggregation,
    )  # fmt: skip
