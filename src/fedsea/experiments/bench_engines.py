"""``fedsea bench federation --parts engines``: the same run file on the native engine and on Flower.

Both engines get the same run file, overrides and seed, so the same data shards (``prepare_run``
draws them from the run's seed), the same initial adapter, the same sampled clients and the
same per-client seeds (data order, noise); they differ in the control plane only (fedsea's
coordinator over its gRPC service, or Flower's ServerApp and virtual SuperNodes on Ray). Each
run's global adapter is evaluated after every round on the same validation rows; the peak
resident memory of every process the run starts is sampled (``PeakMemory``) to give the memory
per client: a native client is one ``fedsea join`` process, a Flower virtual client lives in a
Ray worker that serves several of them in turn (``FEDSEA_FLOWER_CLIENTS``, default 4).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ENGINES = ("native", "flower")
# The default run file: the ``make demo`` run (SmolLM2-135M, sst2, 3 clients, hierarchical, noise).
DEMO_RUN_FILE = str(Path(__file__).resolve().parents[1] / "federation" / "demo.toml")


class PeakMemory:
    """Samples the resident memory (RSS) of this process and all its descendants every ``every_s``.

    Keeps each process's peak, keyed by its pid, with a role read from its command line:
    ``driver`` (this process), ``ray-worker`` (Flower's virtual clients), ``ray`` (Ray's own
    processes: raylet, GCS), ``client`` (``fedsea join``), ``server`` (``fedsea serve``) or ``other``.
    """

    def __init__(self, every_s: float = 1.0) -> None:
        self.every_s = every_s
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="peak-memory", daemon=True)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5 * self.every_s)

    @staticmethod
    def _role(cmdline: list[str], me: bool) -> str:
        text = " ".join(cmdline)
        if me:
            return "driver"
        if "ray::" in text or "default_worker.py" in text:
            return "ray-worker"
        if "ray" in text:
            return "ray"
        if " join" in text:
            return "client"
        if " serve" in text:
            return "server"
        return "other"

    def _loop(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            for pid, (rss, cmdline) in _descendants(me).items():
                role = self.peaks.get(pid, ("", 0))[0] or self._role(cmdline, pid == me)
                if rss > self.peaks.get(pid, (role, 0))[1]:
                    self.peaks[pid] = (role, rss)
            self._stop.wait(self.every_s)

    def summary(self) -> dict[str, list[float]]:
        """Each role's peaks in MiB, largest first."""
        out: dict[str, list[float]] = {}
        for role, rss in self.peaks.values():
            out.setdefault(role, []).append(round(rss / 2**20, 1))
        return {role: sorted(values, reverse=True) for role, values in sorted(out.items())}


def _descendants(root: int) -> dict[int, tuple[int, list[str]]]:
    """``root`` and its descendants: pid -> (RSS in bytes, command line), read from Linux's ``/proc``.

    (``/proc`` rather than psutil: psutil is not a dependency of fedsea.) Processes that end
    while being read are skipped; off Linux the result is empty.
    """
    info: dict[int, tuple[int, int, list[str]]] = {}  # pid -> (parent pid, RSS, command line)
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            # /proc/PID/stat: "pid (comm) state ppid ...": the name may hold spaces, so split after ")".
            ppid = int(entry.joinpath("stat").read_text().rsplit(")", 1)[1].split()[1])
            rss_kib = next(
                int(line.split()[1]) for line in entry.joinpath("status").read_text().splitlines()
                if line.startswith("VmRSS:")
            )  # fmt: skip
            cmdline = entry.joinpath("cmdline").read_bytes().decode(errors="replace").split("\0")
        except (OSError, ValueError, IndexError, StopIteration):
            continue  # ended meanwhile, or a kernel thread (no VmRSS)
        info[int(entry.name)] = (ppid, rss_kib * 1024, cmdline)
    out, todo = {}, [root]
    while todo:
        pid = todo.pop()
        if pid in info and pid not in out:
            out[pid] = info[pid][1:]
            todo += [child for child, (parent, _, _) in info.items() if parent == pid]
    return out


def _accuracy_by_round(run_dir: Path) -> dict[int, float]:
    """The main metric of each evaluated round (0: the base model) from the run's ``metrics.jsonl``."""
    from fedsea.federation.report import _main_metric

    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if record.get("type") == "eval":
            out[int(record["round"])] = round(_main_metric(record)[1], 4)
    return out


def _rounds(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (run_dir / "server_rounds.jsonl").read_text().splitlines() if x.strip()]


def run_engine(engine: str, run_file: str, overrides: list[str], run_dir: Path) -> dict[str, Any]:
    """Run ``run_file`` with ``overrides`` on ``engine`` into ``run_dir``; accuracy, time, memory."""
    from fedsea.federation.checkpoint import latest_round, load_round

    started = time.monotonic()
    with PeakMemory() as memory:
        if engine == "native":
            from fedsea.federation.simulate import simulate

            summary = simulate(run_file, overrides, run_dir=str(run_dir), progress=False, eval_every_round=True)
        elif engine == "flower":
            from fedsea.flower.simulation import simulate_on_flower

            summary = simulate_on_flower(run_file, overrides, run_dir=str(run_dir))
        else:
            raise ValueError(f"unknown engine {engine!r}; known: {', '.join(ENGINES)}")
    rounds = _rounds(run_dir)
    folder = latest_round(run_dir)
    final = load_round(folder)[1] if folder is not None else {}
    return {
        "engine": engine,
        "metric": summary["metric"],
        "before": summary["before"],
        "after": summary["after"],
        "by_round": _accuracy_by_round(run_dir),
        "selected": [r["selected"] for r in rounds],
        "client_loss_by_round": [round(sum(r["losses"].values()) / max(1, len(r["losses"])), 4) for r in rounds],
        "rounds_s": round(sum(r["seconds"] for r in rounds), 1),
        "wall_s": round(time.monotonic() - started, 1),
        "peak_rss_mib": memory.summary(),
        "final_state": final,
    }


def compare_engines(
    engines: tuple[str, ...] = ENGINES,
    run_file: str | None = None,
    overrides: tuple[str, ...] = (),
    keep: str | None = None,
) -> dict[str, Any]:
    """Run the same run file on each of ``engines`` (one after the other); side by side.

    Args:
        engines: ``native`` and/or ``flower``.
        run_file: the run file (default: ``make demo``'s, ``fedsea/federation/demo.toml``).
        overrides: ``section.key=value`` for every engine's run.
        keep: a folder to keep the runs in (``<keep>/<engine>``); default: a temporary one, removed.

    Returns:
        One row per engine (accuracy per round, client losses, seconds, peak RSS per process
        role in MiB), and with both engines the accuracy difference and the largest absolute
        difference between their final global adapters.
    """
    import torch

    run_file = run_file or DEMO_RUN_FILE
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="fedsea-bench-engines-"))
    rows = {}
    try:
        for engine in engines:
            rows[engine] = run_engine(engine, run_file, list(overrides), root / engine)
    finally:
        if keep is None:
            shutil.rmtree(root, ignore_errors=True)
    result: dict[str, Any] = {"run_file": run_file, "overrides": list(overrides), "cpus": os.cpu_count()}
    states = {e: r.pop("final_state") for e, r in rows.items()}
    result["engines"] = rows
    if len(rows) == 2:
        a, b = (rows[e] for e in ENGINES)
        result["after_diff_points"] = round(100 * (b["after"] - a["after"]), 2)
        sa, sb = (states[e] for e in ENGINES)
        if sa and sb and sa.keys() == sb.keys():
            result["max_abs_adapter_diff"] = max(float((sa[k] - sb[k]).abs().max()) for k in sa)
            scale = max(float(torch.stack([v.abs().max() for v in sa.values()]).max()), 1e-12)
            result["max_rel_adapter_diff"] = result["max_abs_adapter_diff"] / scale
    return result
