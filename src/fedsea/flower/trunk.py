"""The trunk server of a Flower run: found at ``trunk-address``, or started by the ServerApp.

A simulation on one machine has no ``fedsea serve`` running: the ServerApp then starts one in
its own process (a thread, on loopback), with a token per client of the run file and an
operator token for itself, and the run folder's certificates when the run asks for TLS
(``prepare_run`` made them), as ``fedsea simulate`` does with its server process.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedsea.client.connection import ClientTls
from fedsea.errors import FedseaError
from fedsea.federation.simconfig import RunPlan
from fedsea.flower.settings import FlowerRun
from fedsea.server.trunk import TrunkHost

OPERATOR = "flower-serverapp"  # the operator identity the ServerApp holds on a trunk it started


@dataclass
class TrunkEndpoint:
    """Where the trunk server is and how the ServerApp reaches it as an operator."""

    address: str
    operator_token: str | None
    tls: ClientTls | None
    host: TrunkHost | None = None  # set when this process serves the trunk
    _thread: Any = field(default=None, repr=False)

    def close(self) -> None:
        """Stop the trunk server this process started (nothing for one found elsewhere)."""
        if self._thread is not None:
            self._thread.stop()
            self._thread = None


def client_tls(run_dir: Path) -> ClientTls | None:
    """The run folder's client TLS files (mutual TLS), if the run made certificates."""
    secrets = run_dir / "secrets"
    if not (secrets / "ca.pem").exists():
        return None
    return ClientTls(secrets / "ca.pem", secrets / "client.pem", secrets / "client.key")


def find_or_start_trunk(run: FlowerRun, plan: RunPlan, run_dir: Path) -> TrunkEndpoint:
    """The trunk of ``run``: the server at ``trunk-address``, else one started here on loopback."""
    if run.trunk_address:
        try:
            token = Path(run.operator_token_file).read_text().strip() if run.operator_token_file else None
        except OSError as exc:
            raise ValueError(f"operator-token-file {run.operator_token_file}: {exc.strerror or exc}") from None
        if not token:
            raise ValueError(
                "trunk-address needs operator-token-file: a file holding an operator token of that server "
                "(fedsea token add NAME --operator)"
            )
        tls = ClientTls(Path(run.tls_ca)) if run.tls_ca else None
        return TrunkEndpoint(run.trunk_address, token, tls)
    return _start_trunk(plan, run_dir)


def _start_trunk(plan: RunPlan, run_dir: Path) -> TrunkEndpoint:
    from fedsea.model.load import load_model
    from fedsea.server.app import ServerThread, ServerTls, TrunkServer
    from fedsea.wire.auth import TokenStore

    secrets = run_dir / "secrets"
    store = TokenStore.load(secrets / "tokens.json")
    operator = store.add(OPERATOR, role="operator")  # in memory only: this process is its only holder
    tls = None
    if (secrets / "ca.pem").exists():
        tls = ServerTls(secrets / "server.pem", secrets / "server.key", secrets / "ca.pem")
    model = plan.config.server_model()
    host = TrunkHost(load_model(model.source, dtype=model.dtype, device=model.device, spread=True), plan.config.limits)
    thread = ServerThread(TrunkServer(host, tokens=store, tls=tls))
    port = thread.start()
    return TrunkEndpoint(f"127.0.0.1:{port}", operator, client_tls(run_dir), host, thread)


def client_token(run_dir: Path, name: str) -> str:
    """A simulated client's token, from the run folder (``prepare_run`` wrote one per client)."""
    tokens = json.loads((run_dir / "secrets" / "client_tokens.json").read_text())
    if name not in tokens:
        raise ValueError(f"no token for client {name!r} in {run_dir / 'secrets'}; the run has {', '.join(tokens)}")
    return str(tokens[name])


class ClientNameError(FedseaError):
    """A client's trunk-server token is named otherwise than its run-file client: one name per client."""


def check_publishers(key: str, wanted: Sequence[str], published: Sequence[str]) -> None:
    """Refuse trunk adapters published under ``key`` by identities that are not the round's clients.

    The trunk server knows a client by its token's name; the ServerApp by the run file's client
    name (the node config's ``name``). Were they different, the round's trunk adapters would be
    found under names the ServerApp does not know, and every reply would be left out without a
    word: refused here instead, naming both, so that one name holds everywhere (trunk server's
    log, the ServerApp's round lines, ``server_rounds.jsonl``, ``metrics.jsonl``, the report).

    Raises:
        ClientNameError: ``published`` holds a name not in ``wanted``.
    """
    strangers = sorted(set(published) - set(wanted))
    if strangers:
        missing = sorted(set(wanted) - set(published))
        raise ClientNameError(
            f"stage {key}: the trunk server has trunk adapters from token(s) {', '.join(strangers)}, which are "
            f"not clients of this round ({', '.join(wanted) or 'none'}"
            + (f"; none from {', '.join(missing)}" if missing else "")
            + "): name each data owner's token as its client in the run file and node config "
            '(fedsea token add tokens.json client-0 for name="client-0")'
        )


class NamedOperator:
    """A ``TrunkOperator`` whose ``collect`` checks that the publishers are the round's clients.

    It collects every state published under the round's stage key (the key is the round's, its
    publishers are this round's clients) and refuses strangers (``check_publishers``).
    """

    def __init__(self, operator: Any) -> None:
        self.operator = operator

    def stage(
        self,
        key: str,
        state: dict[str, torch.Tensor],
        group: Sequence[str] | None = None,
        step_timeout_s: float = 300.0,
    ) -> None:
        """Stage the global trunk adapter (``TrunkOperator.stage``; ``group``: a client-batch group's members)."""
        if group is None:
            self.operator.stage(key, state)
        else:
            self.operator.stage(key, state, group=group, step_timeout_s=step_timeout_s)

    def collect(
        self, key: str, client_ids: Sequence[str] = (), drop: bool = False
    ) -> dict[str, dict[str, torch.Tensor]]:
        """``TrunkOperator.collect`` of every publisher under ``key``, checked against ``client_ids``."""
        states: dict[str, dict[str, torch.Tensor]] = self.operator.collect(key, (), drop=drop)
        if client_ids:
            check_publishers(key, client_ids, list(states))
        return states
