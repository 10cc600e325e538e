"""fedsea's Flower ``ServerApp``: ``fedsea.flower.server_app:app`` (see ``fedsea.flower``)."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsea.errors import FedseaError
from fedsea.flower.settings import FlowerRun

logger = logging.getLogger("fedsea.flower")

app = ServerApp()


class FlowerRunError(FedseaError):
    """The run cannot go on (a bad setting, a missing file, a trunk server refusing): one line, no traceback."""


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the federation the run config describes (``fedsea.flower.settings``).

    An error a user can act on (``FedseaError``, ``ValueError``, ``OSError``: a setting, a file,
    the trunk server) fails the run with one line in the ``flwr run`` output, ``FlowerRunError:
    fedsea: error: ...`` as the CLI prints it: Flower logs the exception with its traceback, so
    this process's traceback limit is set to 0 first (the process ends with the run).
    """
    fedsea_logger = logging.getLogger("fedsea")
    if not fedsea_logger.handlers and not logging.getLogger().handlers:
        # Flower logs its own lines; show fedsea's beside them (a root handler would repeat Flower's).
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        fedsea_logger.addHandler(handler)
        fedsea_logger.setLevel(logging.INFO)
    try:
        serve_run(FlowerRun.from_config(dict(context.run_config)), grid, str(context.run_id))
    except (FedseaError, ValueError, OSError) as exc:
        sys.tracebacklimit = 0
        raise FlowerRunError(f"fedsea: error: {exc}") from None


def serve_run(run: FlowerRun, grid: Grid, run_id: str) -> dict[str, Any]:
    """Prepare the run folder, find or start the trunk server, play the rounds; returns the final global state."""
    from fedsea.client.staging import TrunkOperator
    from fedsea.federation.initial import initial_global_state
    from fedsea.federation.simconfig import dump_tree
    from fedsea.federation.simulate import prepare_run
    from fedsea.flower.rounds import FlowerRounds
    from fedsea.flower.strategies import make_strategy
    from fedsea.flower.trunk import NamedOperator, find_or_start_trunk
    from fedsea.io import atomic_write_text
    from fedsea.model.load import load_model
    from fedsea.server.trunk import TrunkHost

    started = time.time()
    plan = run.plan()
    run_dir = Path(run.run_dir or f"runs/flower-{plan.config.task.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    # A relative run-dir is taken from this process's folder: on the Deployment Engine the
    # SuperLink's (where it was started), not the app's; say where the run folder is.
    run_dir = run_dir.resolve()
    logger.info("run folder %s", run_dir)
    info: dict[str, Any] = {"partition": "(resumed)" if run.resume else ""}
    if not (run_dir / "config.toml").exists():
        if run.trunk_address:  # the clients bring their own data and tokens
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / "config.toml", dump_tree(plan.tree))
        else:  # one machine: shards, tokens and certificates for the simulated clients
            info = prepare_run(plan, run_dir)
            if info.get("partition"):
                logger.info("data partition:\n%s", info["partition"])
    try:
        endpoint = find_or_start_trunk(run, plan, run_dir)
    except (FedseaError, ValueError, OSError) as exc:
        if run.trunk_address:  # a setting of the run config: its own words
            raise
        # The trunk server this process starts (a simulation): worded as fedsea simulate's native engine does.
        raise FedseaError(f"the server did not start ({exc})") from None
    try:
        host = endpoint.host
        if host is None:  # the initial adapter needs the model's shapes (peft draws it with the run's seed)
            model = plan.config.server_model()
            host = TrunkHost(load_model(model.source, dtype=model.dtype, device="cpu"))
        state = initial_global_state(host, plan.fed)
        strategy = make_strategy(run.strategy_name(plan), plan.fed)
        with TrunkOperator(endpoint.address, endpoint.operator_token, tls=endpoint.tls) as operator:
            rounds = FlowerRounds(plan, grid, NamedOperator(operator), endpoint.address, host.num_layers, strategy,
                                  run_dir, run_id, secure_aggregation=run.secure_aggregation)  # fmt: skip
            final = rounds.run(state, resume=run.resume)
    finally:
        endpoint.close()
    if run.report:
        write_run_report(run, plan, run_dir, info, rounds.nodes.values(), started)
    return final


def write_run_report(run: FlowerRun, plan: Any, run_dir: Path, info: dict[str, Any], nodes: Any,
                     started: float) -> dict[str, Any]:  # fmt: skip
    """Evaluate and report the finished run as ``fedsea simulate`` does (one report writer), log the summary.

    ``nodes``: the clients that joined (``NodeInfo``); when the clients brought their own data
    (the Deployment Engine), the report's data section lists their sample counts.
    """
    from fedsea.federation.cuts import schedule_text
    from fedsea.federation.simulate import report_run
    from fedsea.flower.runlog import final_line, lost_clients

    if not info.get("partition"):
        rows = [f"{n.name}: {n.num_examples} examples, (p, q) = ({n.head_layers}, {n.tail_layers})"
                + (f", cuts {schedule_text(n.cuts)}" if n.cuts else "")
                for n in sorted(nodes, key=lambda n: n.name)]  # fmt: skip
        info = {**info, "partition": "each data owner's own data, on its machine:\n" + "\n".join(rows)}
    logger.info("evaluating (%s) and writing the report", run.evaluate)
    summary = report_run(plan, run_dir, info, started, lost_clients(run_dir), evaluate=run.evaluate != "none",
                         eval_every_round=run.evaluate == "rounds")  # fmt: skip
    summary["engine"] = "flower"
    logger.info("%s", final_line(summary))
    return summary
