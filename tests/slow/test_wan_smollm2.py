"""The shaper against the delaying TCP proxy on SmolLM2 at the benchmarks' 25 ms one way.

Here the trunk's compute per token (tens of ms) is of the order of the latency: a shaper that
slept after handing the step to the server (as it once did) let the server compute during the
uplink's delay and came out ~20% faster than the real link. The bound here is 10%, which that
fault breaks and the load of a shared 2-core machine does not; the 5% agreement is measured side
by side by ``fedsea bench wan`` (BENCHMARKS.md)."""

from __future__ import annotations

import pytest

from fedsea.experiments.bench_wan import bench_wan


@pytest.mark.slow
def test_the_shaper_agrees_with_the_proxy_on_smollm2_generation_at_25_ms():
    result = bench_wan("smollm2-135m", latency_ms=25, new_tokens=12, tokens=64, repeats=2, train_steps=False)
    assert 0.9 <= result["shaper_vs_proxy_generate"] <= 1.1, result
