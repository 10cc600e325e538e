"""The multi-tenant scheduler (issue 17, item 2): steps queued together run as one pass, a refused
step fails alone, ``max_joint_tokens`` bounds a pass, and answers equal the streams' passes alone."""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import torch

import fedsea
from fedsea.config import LoraSpec, OptimConfig, ServerLimits
from fedsea.errors import InvalidInputError, ProtocolError
from fedsea.server.generation import GenerationHost, GenStream
from fedsea.server.multitenant import JointScheduler
from fedsea.server.trunk import SessionSpec, TrunkHost
from tests.conftest import assert_close_to_scale


def _setup(limits: ServerLimits | None = None) -> tuple[TrunkHost, GenerationHost, list[GenStream]]:
    host = TrunkHost(fedsea.tiny_llama(num_layers=4, hidden_size=64, num_heads=4, vocab_size=512), limits)
    generation = GenerationHost(host)
    streams = []
    for i in range(4):
        spec = SessionSpec(1, 1, LoraSpec(r=4, dropout=0.0), OptimConfig(), 0, seed=i)
        session = host.open_session(f"client-{i % 2}", host.fingerprint, spec)
        state = host.get_adapter(session.owner, session.id)
        gen = torch.Generator().manual_seed(i)
        host.put_adapter(
            session.owner, session.id, {k: torch.randn(v.shape, generator=gen) * 0.2 for k, v in state.items()}
        )
        streams.append(generation.open(session.owner, session.id, 64, naive=False))
    return host, generation, streams


def _scheduled(generation: GenerationHost, steps: list[tuple[Any, ...]]) -> tuple[list[Any], JointScheduler]:
    """Queue ``steps`` (stream, step, hidden, lengths) at once; their (output, seconds) (or errors) in order."""
    executor = ThreadPoolExecutor(max_workers=1)

    async def main() -> tuple[list[Any], JointScheduler]:
        loop = asyncio.get_running_loop()

        async def compute(fn: Any, *args: Any) -> tuple[Any, float]:
            return await loop.run_in_executor(executor, lambda: (fn(*args), 0.0))

        scheduler = JointScheduler(generation, compute, generation.limits)
        calls = [scheduler.step(stream, step, hidden, lengths, []) for stream, step, hidden, lengths in steps]
        return await asyncio.gather(*calls, return_exceptions=True), scheduler

    try:
        return asyncio.run(main())
    finally:
        executor.shutdown()


def test_steps_queued_together_share_one_pass_and_a_refused_step_fails_alone():
    _, generation, streams = _setup()
    gen = torch.Generator().manual_seed(0)
    hidden = [torch.randn(1, n, 64, generator=gen) for n in (5, 9, 3, 4)]
    poisoned = hidden[2].clone()
    poisoned[0, 1, 3] = float("nan")
    steps = [
        (streams[0], 0, hidden[0], [5]),
        (streams[1], 0, hidden[1], [9]),
        (streams[2], 0, poisoned, [3]),  # NaN: refused
        (streams[3], 1, hidden[3], [4]),  # the stream expects step 0
    ]
    answers, scheduler = _scheduled(generation, steps)
    assert isinstance(answers[2], InvalidInputError)
    assert isinstance(answers[3], ProtocolError)
    assert scheduler.stats.joint_passes == 1 and scheduler.stats.joint_steps == 2
    # The two good streams got their own pass's answer, and their caches went on from it.
    _, alone_gen, alone_streams = _setup()
    for i in (0, 1):
        want = alone_gen.step(alone_streams[i], 0, hidden[i], [hidden[i].shape[1]], [])
        assert_close_to_scale(answers[i][0], want, rel=1e-5)
        assert streams[i].step == 1 and streams[i].lengths is not None
    # Refused streams did not advance; one of them can still go on, alone.
    assert streams[2].step == 0 and streams[3].step == 0
    assert generation.step(streams[3], 0, hidden[3], [4], []).shape == (1, 4, 64)


def test_max_joint_tokens_bounds_a_pass():
    _, generation, streams = _setup(ServerLimits(max_joint_tokens=10))
    hidden = [torch.randn(1, n, 64) for n in (4, 5, 6, 3)]
    answers, scheduler = _scheduled(generation, [(s, 0, h, [h.shape[1]]) for s, h in zip(streams, hidden, strict=True)])
    assert all(isinstance(a, tuple) and a[0].shape == h.shape for a, h in zip(answers, hidden, strict=True))
    # 4 + 5 tokens fit, 6 would not: then 6 + 3 in the next pass (first come, first served).
    assert scheduler.stats.sizes == {2: 2}


@pytest.mark.parametrize("value", [-1.0, 1001.0])
def test_joint_wait_ms_is_checked(value):
    with pytest.raises(ValueError, match="joint_wait_ms"):
        ServerLimits(joint_wait_ms=value)
