"""Benchmarks (``fedsea bench ...``): each prints one JSON line. Figures go to BENCHMARKS.md."""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from typing import Any

from fedsea.model.load import DEFAULT_MODEL, load_model


def bench_load(source: str = DEFAULT_MODEL, repeats: int = 3) -> dict[str, Any]:
    """Time the first load of ``source`` into an empty cache (GGUF conversion) and cached loads.

    Target: a cached load under 2 s.
    """
    saved = os.environ.get("FEDSEA_CACHE")
    with tempfile.TemporaryDirectory(prefix="fedsea-bench-") as cache:
        os.environ["FEDSEA_CACHE"] = cache
        try:
            t0 = time.perf_counter()
            load_model(source)
            first = time.perf_counter() - t0
            cached = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                load_model(source)
                cached.append(time.perf_counter() - t0)
        finally:
            if saved is None:
                os.environ.pop("FEDSEA_CACHE", None)
            else:
                os.environ["FEDSEA_CACHE"] = saved
    return {
        "bench": "load",
        "source": source,
        "first_load_s": round(first, 3),
        "cached_load_s": round(statistics.median(cached), 3),
        "speedup": round(first / statistics.median(cached), 1),
        "target_cached_load_s": 2.0,
    }
