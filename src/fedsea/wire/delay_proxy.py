"""A loopback TCP proxy that delays every byte by a one-way latency: a WAN link on one machine.

The reference the ``NetShaper`` is checked against (``fedsea bench wan``, tests): a client
connects to the proxy instead of the server, and every byte it sends reaches the server
``latency_ms`` after the client wrote it, and every byte back likewise. Unlike the shaper, it
delays what really crosses the socket: HTTP/2 frames, flow-control window updates, pings, TLS
records, so whatever the protocol does per round trip costs what it costs on a real link.

Each direction of each connection is one pump: a reader stamps each chunk with the time it was
read and queues it, a writer delivers it at stamp + latency (+ its serialization time over
``mbps``, after the chunks ahead of it). Reading never waits on writing: the link buffers what
is in flight, as a network path with a large buffer does. The proxy runs its own event loop in
a thread, so synchronous code (tests, benchmarks) can use it.

    with DelayProxy("127.0.0.1:50051", latency_ms=25) as proxy:
        client = SplitClient(proxy.address, ...)   # 25 ms each way, 50 ms per round trip
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass
from typing import Any


@dataclass
class ProxyStats:
    """Connections accepted and bytes carried each way."""

    connections: int = 0
    up_bytes: int = 0  # client -> server
    down_bytes: int = 0  # server -> client


class DelayProxy:
    """A TCP proxy on ``127.0.0.1`` to ``target`` (``host:port``) adding ``latency_ms`` each way.

    Args:
        target: where to connect for each accepted connection.
        latency_ms: one-way delay added to every byte, each direction.
        mbps: bandwidth of each direction (megabits per second); 0 is unlimited.
        chunk_bytes: the most one read takes from a socket.
    """

    def __init__(self, target: str, latency_ms: float, mbps: float = 0.0, chunk_bytes: int = 64 * 1024) -> None:
        if latency_ms < 0 or mbps < 0:
            raise ValueError(f"latency_ms and mbps must be >= 0, got {latency_ms} and {mbps}")
        host, _, port = target.rpartition(":")
        self.target = (host.strip("[]") or "127.0.0.1", int(port))
        self.latency_s = latency_ms / 1000
        self.mbps = mbps
        self.chunk_bytes = chunk_bytes
        self.stats = ProxyStats()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.base_events.Server | None = None
        self._thread: threading.Thread | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` to connect to instead of the target."""
        return f"127.0.0.1:{self.port}"

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> int:
        """Listen on a free loopback port (in a thread of its own); return the port."""
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                self._server = loop.run_until_complete(asyncio.start_server(self._accept, "127.0.0.1", 0))
                self.port = int(self._server.sockets[0].getsockname()[1])
            except BaseException as exc:  # reported to the starting thread
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.close()

        self._thread = threading.Thread(target=run, name="fedsea-delay-proxy", daemon=True)
        self._thread.start()
        ready.wait(10)
        if failure:
            raise failure[0]
        return self.port

    def stop(self) -> None:
        """Close the listener and every connection; wait for the thread."""
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

        with contextlib.suppress(RuntimeError):  # the loop stopped already
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._loop = None

    def __enter__(self) -> DelayProxy:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connections -------------------------------------------------------------------------------
    async def _accept(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self.stats.connections += 1
        try:
            server_reader, server_writer = await asyncio.open_connection(*self.target)
        except OSError:
            client_writer.close()
            return
        pumps = [
            asyncio.ensure_future(self._pump(client_reader, server_writer, up=True)),
            asyncio.ensure_future(self._pump(server_reader, client_writer, up=False)),
        ]
        for task in pumps:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        # Either side closing ends the other's direction once its bytes in flight are delivered.
        await asyncio.gather(*pumps, return_exceptions=True)
        for writer in (client_writer, server_writer):
            writer.close()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up: bool) -> None:
        """Carry one direction: every chunk delivered ``latency`` (+ transfer) after it was read."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            link_free = 0.0  # when this direction's link has sent the chunks ahead
            while True:
                data = await reader.read(self.chunk_bytes)
                now = time.monotonic()
                if self.mbps > 0 and data:
                    link_free = max(now, link_free) + len(data) * 8 / (self.mbps * 1e6)
                    due = link_free + self.latency_s
                else:
                    due = now + self.latency_s
                await queue.put((due, data))
                if not data:  # EOF: delivered after the bytes ahead of it
                    return

        reading = asyncio.ensure_future(read())
        try:
            while True:
                due, data = await queue.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
                if up:
                    self.stats.up_bytes += len(data)
                else:
                    self.stats.down_bytes += len(data)
        except (ConnectionError, OSError):
            return
        finally:
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError, ConnectionError, OSError):
                await reading


class ProxyProcess:
    """A ``DelayProxy`` in a process of its own (``python -m fedsea.wire.delay_proxy``): the faithful
    way to measure, since an in-process proxy competes for the interpreter lock with the client.

        with ProxyProcess("127.0.0.1:50051", latency_ms=25) as address:
            client = SplitClient(address, ...)
    """

    def __init__(self, target: str, latency_ms: float, mbps: float = 0.0) -> None:
        self.args = [target, str(latency_ms), str(mbps)]
        self._proc: Any = None

    def __enter__(self) -> str:
        import subprocess
        import sys

        self._proc = subprocess.Popen(
            [sys.executable, "-m", "fedsea.wire.delay_proxy", *self.args], stdout=subprocess.PIPE, text=True
        )
        line = self._proc.stdout.readline().strip()
        if not line.isdigit():
            self.__exit__()
            raise RuntimeError(f"the delay proxy did not start (it printed {line!r})")
        return f"127.0.0.1:{int(line)}"

    def __exit__(self, *exc: object) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait(timeout=10)
            self._proc.stdout.close()
            self._proc = None


def main(argv: list[str] | None = None) -> int:
    """``python -m fedsea.wire.delay_proxy TARGET LATENCY_MS [MBPS]``: run a proxy until killed.

    Prints ``PORT`` on the first line of stdout once it listens. In a process of its own the
    proxy shares no interpreter lock with the client or the server it sits between.
    """
    import sys

    args = sys.argv[1:] if argv is None else argv
    if len(args) not in (2, 3):
        print("usage: python -m fedsea.wire.delay_proxy TARGET LATENCY_MS [MBPS]", file=sys.stderr)
        return 2
    proxy = DelayProxy(args[0], float(args[1]), float(args[2]) if len(args) == 3 else 0.0)
    print(proxy.start(), flush=True)
    try:
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        proxy.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
