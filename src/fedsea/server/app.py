"""Starting, running and stopping the trunk server (``fedsea serve``).

``TrunkServer`` binds a ``grpc.aio`` server to an address with TLS (optionally mutual) or,
on loopback only unless told otherwise, plaintext. Off loopback it also wants client
authentication (tokens or a client CA) unless told ``allow_anonymous``: without it every
caller is the one identity ``anonymous``, and shares its sessions and figures with all others.
``ServerThread`` runs one in a background thread with its own event loop, for tests and
benchmarks in one process.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import threading
from dataclasses import dataclass
from pathlib import Path

import grpc

from fedsea.server.handlers import add_trunk_service
from fedsea.server.rounds import RoundServiceFactory
from fedsea.server.service import TrunkServicer
from fedsea.server.trunk import TrunkHost
from fedsea.wire import keepalive
from fedsea.wire.auth import TokenStore

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerTls:
    """PEM files: the server's certificate and key; a CA to require client certificates from."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        """gRPC server credentials from the PEM files; client certificates required when ``client_ca`` is set."""
        ca = self.client_ca.read_bytes() if self.client_ca else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback IP addresses (IPv6 may be in brackets)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class TrunkServer:
    """A trunk server bound to ``host:port`` (port 0 picks a free one).

    Raises:
        ValueError: for plaintext on a non-loopback address without ``insecure=True``, or
            no client authentication (neither ``tokens`` nor ``tls.client_ca``) on a
            non-loopback address without ``allow_anonymous=True``.
    """

    def __init__(
        self,
        trunk_host: TrunkHost,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: ServerTls | None = None,
        tokens: TokenStore | None = None,
        insecure: bool = False,
        rounds: RoundServiceFactory | None = None,
        allow_anonymous: bool = False,
    ) -> None:
        self.check_bind(host, tls, insecure)
        self.check_identity(host, tls, tokens, allow_anonymous)
        self.trunk_host = trunk_host
        self.host, self.port = host, port
        self.tls, self.tokens = tls, tokens
        self.servicer = TrunkServicer(trunk_host, tokens)
        self.rounds = rounds
        self._server: grpc.aio.Server | None = None
        self._reaper: asyncio.Task[None] | None = None

    @staticmethod
    def check_bind(host: str, tls: ServerTls | None, insecure: bool) -> None:
        """Refuse plaintext on a non-loopback address unless ``insecure``."""
        if tls is None and not is_loopback(host) and not insecure:
            raise ValueError(
                f"refusing to serve plaintext on {host!r}, which is not a loopback address: "
                "give --tls-cert and --tls-key, or --insecure to accept the risk"
            )

    @staticmethod
    def check_identity(host: str, tls: ServerTls | None, tokens: TokenStore | None, allow_anonymous: bool) -> None:
        """Refuse a non-loopback address with no client authentication unless ``allow_anonymous``.

        Without tokens or a client CA, every caller is ``anonymous``: one identity, so anyone who
        can reach the port can read and close everyone's sessions.
        """
        if tokens is None and (tls is None or tls.client_ca is None) and not is_loopback(host) and not allow_anonymous:
            raise ValueError(
                f"refusing to serve on {host!r}, which is not a loopback address, without client "
                "authentication: give --tokens or --tls-client-ca, or --allow-anonymous to let every "
                "caller in as one shared identity"
            )

    async def start(self) -> int:
        """Bind, register the servicer (and round coordinator), start serving and reaping; return the port."""
        limit = self.trunk_host.limits.max_message_bytes
        self._server = grpc.aio.server(
            options=keepalive.server_options(
                ("grpc.max_receive_message_length", limit), ("grpc.max_send_message_length", limit)
            )
        )
        add_trunk_service(self.servicer, self._server)  # requests parsed by fedsea: INVALID_ARGUMENT if undecodable
        if self.rounds is not None:
            self.servicer.coordinator = self.rounds(self.trunk_host, self.servicer.run_blocking)
        address = f"{self.host}:{self.port}" if ":" not in self.host else f"[{self.host}]:{self.port}"
        if self.tls is not None:
            self.port = self._server.add_secure_port(address, self.tls.credentials())
        else:
            self.port = self._server.add_insecure_port(address)
        await self._server.start()
        self._reaper = asyncio.create_task(self._reap_forever())
        mode = "mutual TLS" if self.tls and self.tls.client_ca else "TLS" if self.tls else "plaintext"
        logger.info("trunk server on %s:%d (%s, %d token(s))", self.host, self.port, mode, len(self.tokens or ()))
        if self.tokens is None and not (self.tls and self.tls.client_ca) and not is_loopback(self.host):
            logger.warning("no client authentication (--allow-anonymous): every caller is one identity, 'anonymous'")
        return self.port

    async def _reap_forever(self) -> None:
        period = min(5.0, max(0.05, self.trunk_host.limits.idle_timeout_s / 4))
        while True:
            await asyncio.sleep(period)
            closed = await self.servicer.run_blocking(self.trunk_host.reap_idle)
            for session_id in closed:
                logger.info("closed idle session %s", session_id)
            for what in await self.servicer.run_blocking(self.servicer.staging.reap_idle):
                logger.info("freed idle %s", what)

    async def stop(self, grace: float = 5.0) -> None:
        """Stop reaping, stop the server with ``grace`` seconds for in-flight RPCs, shut the servicer down."""
        if self._reaper is not None:
            self._reaper.cancel()
        if self._server is not None:
            await self._server.stop(grace)
        self.servicer.shutdown()

    async def wait(self) -> None:
        """Block until the server terminates (returns at once if it was never started)."""
        if self._server is not None:
            await self._server.wait_for_termination()


async def serve_until_signalled(server: TrunkServer, grace: float = 5.0) -> None:
    """Run until SIGTERM or SIGINT, then stop gracefully (in-flight RPCs get ``grace`` seconds)."""
    port = await server.start()
    print(f"fedsea trunk server listening on {server.host}:{port}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    print("fedsea trunk server: shutting down", flush=True)
    await server.stop(grace)


class ServerThread:
    """A ``TrunkServer`` in a background thread; ``with ServerThread(...) as port: ...``."""

    def __init__(self, server: TrunkServer) -> None:
        self.server = server
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fedsea-server", daemon=True)

    def start(self) -> int:
        """Start the event loop thread and the server on it; return the bound port."""
        self._thread.start()
        return asyncio.run_coroutine_threadsafe(self.server.start(), self._loop).result(timeout=60)

    def stop(self, grace: float = 1.0) -> None:
        """Stop the server, then its event loop, and join the thread."""
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self._loop).result(timeout=60)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    def __enter__(self) -> int:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
