"""A Flower run's settings: the Flower run config (``[tool.flwr.app.config]`` and ``--run-config``).

Keys (all optional):

- ``run-file``: the fedsea run file (the TOML of ``fedsea simulate``: task, model, federation,
  LoRA, noise, clients); relative paths are taken from the app's folder: on the Deployment
  Engine the installed FAB's (``$FLWR_HOME/apps/...``), which ``flwr run`` ships to the SuperLink
  and every SuperNode, so ServerApp and ClientApps read the same file on every machine (an
  absolute path must exist on each machine). Empty: the defaults.
- ``fedsea.<section>.<key>``: an override of that run-file setting, e.g.
  ``fedsea.federation.rounds = 3`` (``--run-config "fedsea.federation.rounds=3"``).
- ``set``: more overrides in one string, ``;``-separated: ``"federation.rounds=3;lora.r=16"``
  (``flwr run`` only overrides keys the app's config declares; this one always is).
- ``run-dir``: where checkpoints, ``server_rounds.jsonl`` and the clients' logs go (the ServerApp
  writes it; in a simulation the ClientApps read their shards and tokens there).
- ``trunk-address``: ``host:port`` of a running ``fedsea serve``; empty: the ServerApp starts a
  trunk server in its own process on loopback (a simulation on one machine).
- ``operator-token-file``: the file holding the operator token for ``trunk-address`` (a secret
  never travels in the run config itself).
- ``tls-ca``: the CA certificate of the trunk server (empty: plaintext, loopback only).
- ``strategy``: the Flower strategy: ``fedavg``, ``fedadam``, ``median`` or ``trimmed-mean``;
  empty: the run file's ``federation.strategy``.
- ``resume``: continue the run in ``run-dir`` from its last checkpoint.
- ``report``: after the last round, evaluate and write the run folder's ``metrics.jsonl``,
  ``report.md`` and plots (``fedsea.federation.simulate.report_run``, what ``fedsea simulate``
  writes) and log where the report is; default true. ``fedsea simulate`` sets it false: it
  reports itself, in its own process, after the Simulation Engine has finished.
- ``evaluate``: which global adapters the report evaluates on the run file's task (its
  ``[task] eval_limit`` rows, on the ServerApp's machine): ``rounds`` (the base model and every
  round's; default), ``last`` (the base model and the last round's) or ``none``.
- ``secure-aggregation``: aggregate the clients' head/tail adapters with Flower's SecAgg+, so the
  ServerApp learns only their weighted sum (``fedsea.flower.secagg``; mode hierarchical, strategy
  fedavg, one cut (p, q) for all clients, at least two clients a round).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsea.federation.simconfig import RunPlan, load_plan

OVERRIDE_PREFIX = "fedsea."
_APP_REFS = ("fedsea.flower.server_app:app", "fedsea.flower.client_app:app")
FLOWER_STRATEGIES = ("fedavg", "fedadam", "fedprox", "median", "trimmed-mean")
EVALUATE = ("rounds", "last", "none")


def installed_app_dir() -> Path | None:
    """The folder of the Flower app running in this process (the installed FAB), if any.

    Flower puts the app's folder first on ``sys.path`` before it imports the app's components
    (``flwr.supercore.object_ref.load_app``); fedsea's components live in the fedsea package, so
    the folder is the ``sys.path`` entry whose ``pyproject.toml`` names them. None outside Flower.
    """
    for entry in sys.path:
        pyproject = Path(entry or ".") / "pyproject.toml"
        try:
            text = pyproject.read_text()
        except OSError:
            continue
        if "[tool.flwr.app.components]" in text and any(ref in text for ref in _APP_REFS):
            return pyproject.parent.resolve()
    return None


@dataclass(frozen=True)
class FlowerRun:
    """The settings of one Flower run of fedsea (see the module docstring for the keys)."""

    run_file: str = ""
    overrides: tuple[str, ...] = ()
    run_dir: str = ""
    trunk_address: str = ""
    operator_token_file: str = ""
    tls_ca: str = ""
    strategy: str = ""
    resume: bool = False
    secure_aggregation: bool = False
    report: bool = True
    evaluate: str = "rounds"

    @classmethod
    def from_config(cls, config: dict[str, Any], app_dir: str | Path | None = None) -> FlowerRun:
        """Read a Flower run config; unknown keys are an error naming them."""
        known = {"run-file", "set", "run-dir", "trunk-address", "operator-token-file", "tls-ca", "strategy", "resume",
                 "secure-aggregation", "report", "evaluate"}  # fmt: skip
        overrides = []
        for key in sorted(config):
            if key.startswith(OVERRIDE_PREFIX):
                value = config[key]
                overrides.append(f"{key[len(OVERRIDE_PREFIX) :]}={json.dumps(value)}")
            elif key not in known:
                raise ValueError(
                    f"unknown run-config key {key!r}: fedsea's Flower app takes {', '.join(sorted(known))} "
                    f"and {OVERRIDE_PREFIX}<section>.<key> overrides of the run file"
                )
        overrides += [a.strip() for a in str(config.get("set", "")).split(";") if a.strip()]
        run_file = str(config.get("run-file", ""))
        if run_file and not Path(run_file).is_absolute():
            folder = Path(app_dir) if app_dir is not None else installed_app_dir()
            if folder is not None:
                run_file = str(folder / run_file)
        strategy = str(config.get("strategy", "")).lower()
        if strategy and strategy not in FLOWER_STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(FLOWER_STRATEGIES)}, got {strategy!r}")
        evaluate = str(config.get("evaluate", "rounds")).lower() or "rounds"
        if evaluate not in EVALUATE:
            raise ValueError(f"evaluate must be one of {', '.join(EVALUATE)}, got {evaluate!r}")
        return cls(
            run_file=run_file,
            overrides=tuple(overrides),
            run_dir=str(config.get("run-dir", "")),
            trunk_address=str(config.get("trunk-address", "")),
            operator_token_file=str(config.get("operator-token-file", "")),
            tls_ca=str(config.get("tls-ca", "")),
            strategy=strategy,
            resume=bool(config.get("resume", False)),
            secure_aggregation=bool(config.get("secure-aggregation", False)),
            report=bool(config.get("report", True)),
            evaluate=evaluate,
        )

    def plan(self) -> RunPlan:
        """The fedsea run plan: the run file (or the defaults) with the overrides."""
        return load_plan(self.run_file or None, self.overrides)

    def strategy_name(self, plan: RunPlan) -> str:
        """The Flower strategy's name: this run's, else the run file's."""
        return self.strategy or plan.fed.strategy.lower()
