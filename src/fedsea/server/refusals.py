"""One log line per refused request, rate-limited per (status code, RPC), with counts.

A hostile or broken client can send tens of thousands of bad requests a minute; logging each
(let alone with a traceback: issue 14 saw 11 MB of log for 72k requests) turns an attack on
the server into an attack on its disk. ``RefusalLog`` logs the first ``burst`` refusals of
each (code, RPC) in a window of ``window_s`` seconds, one line each, then counts the rest
silently and reports the count in one line when the window is over (at the next refusal of
that kind). Tracebacks are for internal faults only, and those are logged by the servicer.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Refusal lines per (code, RPC) per window, and the window: 20 lines a minute for each kind
# keeps a flood to a few hundred lines an hour while every isolated refusal is still logged.
DEFAULT_BURST = 20
DEFAULT_WINDOW_S = 60.0


@dataclass
class _Window:
    start: float
    logged: int = 0
    muted: int = 0


class RefusalLog:
    """Logs refused requests: at most ``burst`` lines per (code, RPC) per ``window_s`` seconds.

    Args:
        logger: where the lines go (at WARNING).
        burst: lines per (code, RPC) per window; later refusals in the window are only counted.
        window_s: the window's length in seconds.
        clock: monotonic seconds (a test's fake clock).
    """

    def __init__(
        self,
        logger: logging.Logger,
        burst: int = DEFAULT_BURST,
        window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if burst < 1 or not window_s > 0:
            raise ValueError(f"burst must be >= 1 and window_s > 0, got {burst} and {window_s}")
        self.logger, self.burst, self.window_s, self.clock = logger, burst, window_s, clock
        self._windows: dict[tuple[str, str], _Window] = {}
        self._lock = threading.Lock()  # refusals come from the event loop and the compute thread
        self.total = 0  # refusals seen, logged or not

    def refused(self, code: str, rpc: str, client: str, detail: str, exc_info: BaseException | None = None) -> bool:
        """Note one refusal of ``rpc`` with ``code``; log it unless its kind is over the rate. True if logged.

        ``detail`` must already be bounded (``fedsea.errors.cap_detail``): it is logged as is.
        ``exc_info`` (an internal fault only) logs its traceback at ERROR, within the same rate.
        """
        now = self.clock()
        with self._lock:
            self.total += 1
            key = (code, rpc)
            window = self._windows.get(key)
            if window is None or now - window.start >= self.window_s:
                if window is not None and window.muted:
                    self.logger.warning(
                        "%d more %s refusal(s) of %s were not logged in the %.0f s before",
                        window.muted,
                        code,
                        rpc,
                        now - window.start,
                    )
                window = self._windows[key] = _Window(now)
            if window.logged >= self.burst:
                window.muted += 1
                return False
            window.logged += 1
            last = window.logged == self.burst
        self.logger.log(
            logging.ERROR if exc_info is not None else logging.WARNING,
            "refused %s from %s: %s %s%s",
            rpc or "request",
            client,
            code,
            detail,
            f" (more {code} refusals of {rpc} muted for up to {self.window_s:.0f} s, then counted)" if last else "",
            exc_info=exc_info,
        )
        return True
