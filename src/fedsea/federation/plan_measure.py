"""Measuring a ``PartyProfile``: real split training steps at two cuts, each segment timed (``fedsea profile``).

See ``fedsea.federation.plan_profile`` for the segments and the lines fitted through them.
"""

from __future__ import annotations

import itertools
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from fedsea.config import LoraSpec, SplitLora
from fedsea.federation.plan_profile import MEMORY_PARTS, SEGMENT_PART, SEGMENTS, Line, PartyProfile, profile_cuts
from fedsea.model.split import SplitModel
from fedsea.training.batch import Batch, lm_loss
from fedsea.training.step import PartOptimizer


@contextmanager
def _saved_bytes(total: list[int], weights: set[int]) -> Iterator[None]:
    """Count the bytes autograd saves for the backward (each storage once) into ``total[0]``.

    ``weights``: the storages of the model's parameters, not counted: a frozen linear layer saves
    its weight for the input's gradient, but the weight is in memory anyway (counted once, as weights).
    """
    seen: set[int] = set(weights)

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(
    split: SplitModel, data: Batch, client_opts: list[PartOptimizer], trunk_opt: PartOptimizer,
    saved: dict[str, list[int]] | None,
) -> list[tuple[str, float]]:  # fmt: skip
    """One split step as ``SplitTrainer`` and the server run it, with a time mark after each segment;
    with ``saved``, the bytes autograd keeps per part are added to it."""
    device = split.model.device
    marks: list[tuple[str, float]] = []

    def mark(name: str) -> None:
        _sync(device)
        marks.append((name, time.perf_counter()))

    weights = {p.untyped_storage().data_ptr() for p in split.model.parameters()} if saved is not None else set()

    def counted(part: str, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        if saved is None:
            return fn()
        with _saved_bytes(saved[part], weights):
            return fn()

    head, trunk, tail = split.head, split.trunk, split.tail
    mark("start")
    h = counted("head", lambda: head(data.input_ids, data.lengths))  # (B, n, d)
    h_noised = h + 0.1 * torch.randn_like(h)  # the privatizer's cost: one normal draw and an add
    mark("head_forward")
    inp = h_noised.detach().requires_grad_(True)
    out = counted("trunk", lambda: trunk(inp, data.lengths))  # (B, n, d)
    mark("trunk_forward")
    received = out.detach().requires_grad_(True)
    loss = counted("tail", lambda: lm_loss(tail(received, data.lengths), data.labels))
    mark("tail_forward")
    loss.backward()
    mark("tail_backward")
    trunk_opt.zero_grad()
    out.backward(received.grad)
    mark("trunk_backward")
    trunk_opt.step()
    mark("trunk_optimizer")
    h_noised.backward(inp.grad)
    mark("head_backward")
    for opt in client_opts:
        opt.step()
    mark("client_optimizer")
    return marks


def _one_cut(
    source: str, dtype: torch.dtype, device: torch.device, cut: tuple[int, int], batch: int, tokens: int,
    lora: LoraSpec | SplitLora, repeats: int,
) -> tuple[dict[str, float], dict[str, int], dict[str, int]]:  # fmt: skip
    """Median seconds per segment and saved bytes per part of real steps at ``cut``; and weight sizes."""
    from fedsea.config import OptimConfig
    from fedsea.model.adapters import adapter_parameters
    from fedsea.model.load import load_model
    from fedsea.model.split import split_model
    from fedsea.training.batch import make_batch

    split = split_model(load_model(source, dtype, device), *cut).add_lora(lora)
    head, trunk, tail = split.head.train(), split.trunk.train(), split.tail.train()
    vocab = int(split.model.config.vocab_size)
    ids = torch.randint(3, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0)).tolist()
    data = make_batch(ids, pad_token_id=0).to(device)
    optim = OptimConfig(lr=1e-4)
    client_opts, trunk_opt = [PartOptimizer(head, optim), PartOptimizer(tail, optim)], PartOptimizer(trunk, optim)
    times: dict[str, list[float]] = {s: [] for s in SEGMENTS}
    saved = {p: [0] for p in MEMORY_PARTS}
    for i in range(repeats + 1):  # the first step warms up (allocations, kernels) and counts the bytes
        marks = _step(split, data, client_opts, trunk_opt, saved if i == 0 else None)
        if i > 0:
            for (_, t0), (name, t1) in itertools.pairwise(marks):
                times[name].append(t1 - t0)
    block = split.model.model.layers[cut[0]]  # a trunk block: its base weights and its LoRA tensors
    adapter = sum(t.numel() * t.element_size() for t in adapter_parameters(block).values())
    base = sum(t.numel() * t.element_size() for n, t in block.named_parameters() if "lora_" not in n)
    embed = split.head.embed_tokens.weight
    fixed = embed.numel() * embed.element_size()
    fixed += sum(t.numel() * t.element_size() for t in split.tail.norm.parameters())
    lm = split.tail.lm_head.weight
    if lm.data_ptr() != embed.data_ptr():  # untied: the LM head is a matrix of its own
        fixed += lm.numel() * lm.element_size()
    sizes = {
        "block_weight_bytes": base,
        "block_adapter_bytes": adapter,
        "client_fixed_weight_bytes": fixed,
        "hidden_size": split.head.hidden_size,
    }
    return {s: statistics.median(v) for s, v in times.items()}, {p: v[0] for p, v in saved.items()}, sizes


def available_memory(device: torch.device) -> int | None:
    """Free memory on ``device`` now: the GPU's free memory, or the host's available memory (Linux's
    ``MemAvailable``, which counts reclaimable caches; else the free pages); None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def _codec_seconds(shape: tuple[int, int, int], wire_dtype: str, repeats: int, compression: str = "none") -> float:
    """Median seconds to encode, serialize, parse and decode one message of ``shape`` (the wire's CPU work)."""
    from fedsea.wire import fedsea_pb2 as pb
    from fedsea.wire.compress import compression as compression_enum
    from fedsea.wire.tensors import decode, encode
    from fedsea.wire.tensors import wire_dtype as wire_enum

    enum, lossy = wire_enum(wire_dtype), compression_enum(compression)
    tensor = torch.randn(shape)
    seconds = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        blobs = [chunk.SerializeToString() for chunk in encode(tensor, enum, compression=lossy)]
        chunks = []
        for blob in blobs:
            chunk = pb.TensorChunk()
            chunk.ParseFromString(blob)
            chunks.append(chunk)
        decode(chunks, "hidden", max_bytes=1 << 40, allow_compression=True)
        seconds.append(time.perf_counter() - t0)
    return statistics.median(seconds[1:])


def measure_profile(
    source: str,
    batch: int,
    tokens: int,
    lora: LoraSpec | SplitLora | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    wire_dtype: str = "auto",
    repeats: int = 3,
    progress: Callable[[str], None] | None = None,
    compression: str = "none",
) -> PartyProfile:
    """Time real training steps of ``source`` at (``batch``, ``tokens``) at two cuts and fit each segment's line.

    Args:
        source: the model (as ``fedsea.model.load.load_model`` takes it).
        batch, tokens: the run's B and n (``[client] batch_size`` and ``max_length``).
        lora: the LoRA of every part, or of each (default ``LoraSpec(dropout=0.0)``).
        device, dtype: where and how the party runs the model (``auto`` resolves as everywhere).
        wire_dtype: the messages' dtype (``auto``: the model's).
        repeats: timed steps per cut (after one warm-up step); medians.
        progress: called with a short line before each stage.
        compression: the wire's lossy compression (``none``, ``int8``, ``fp8``), for the codec's time.
    """
    from fedsea.model.device import resolve_device, resolve_dtype, resolve_wire_dtype
    from fedsea.model.load import model_num_layers

    if batch < 1 or tokens < 2 or repeats < 1:
        raise ValueError(f"need batch >= 1, tokens >= 2 and repeats >= 1, got {batch}, {tokens} and {repeats}")
    parts = SplitLora.uniform(lora or LoraSpec(dropout=0.0)) if not isinstance(lora, SplitLora) else lora
    resolved = resolve_device(device)
    where = resolved if isinstance(resolved, torch.device) else torch.device("cpu")
    torch_dtype = resolve_dtype(dtype, where)
    wire = resolve_wire_dtype(wire_dtype, torch_dtype)
    layers = model_num_layers(source)
    cuts = profile_cuts(layers)
    free = available_memory(where)  # before this process loads anything of its own
    measured = []
    for cut in cuts:
        if progress is not None:
            progress(f"timing {repeats} steps at (p, q) = {cut} ...")
        measured.append(_one_cut(source, torch_dtype, where, cut, batch, tokens, parts, repeats))
    (t0, m0, sizes), (t1, m1, _) = measured

    def blocks(cut: tuple[int, int], part: str) -> int:
        return {"head": cut[0], "tail": cut[1], "client": cut[0] + cut[1], "trunk": layers - cut[0] - cut[1]}[part]

    # The trunk's block count always changes between the two cuts: its slopes stand in for a client
    # part whose count does not (the same blocks on the same machine).
    trunk_slope = {
        kind: Line.fit(blocks(cuts[0], "trunk"), t0[f"trunk_{kind}"], blocks(cuts[1], "trunk"), t1[f"trunk_{kind}"])
        for kind in ("forward", "backward", "optimizer")
    }
    seconds = {}
    for seg in SEGMENTS:
        part, kind = SEGMENT_PART[seg], seg.rsplit("_", 1)[1]
        x0, x1 = blocks(cuts[0], part), blocks(cuts[1], part)
        seconds[seg] = Line.fit(x0, t0[seg], x1, t1[seg], trunk_slope[kind].per_block)
    act_trunk = Line.fit(blocks(cuts[0], "trunk"), m0["trunk"], blocks(cuts[1], "trunk"), m1["trunk"])
    activation = {
        p: Line.fit(blocks(cuts[0], p), m0[p], blocks(cuts[1], p), m1[p], act_trunk.per_block) for p in MEMORY_PARTS
    }
    if progress is not None:
        progress("timing the wire's encode and decode ...")
    return PartyProfile(
        model=source,
        num_layers=layers,
        batch=batch,
        tokens=tokens,
        device=str(where),
        dtype=str(torch_dtype).removeprefix("torch."),
        wire_dtype=wire,
        lora_r=parts.trunk.r if parts.trunk is not None else 0,
        lora=parts.summary(),
        compression=compression,
        memory_bytes=free,
        host=f"{platform.node()} ({torch.get_num_threads()} torch threads)",
        seconds=seconds,
        activation_bytes=activation,
        codec_s=_codec_seconds((batch, tokens, sizes["hidden_size"]), wire, repeats, compression),
        created=time.time(),
        hidden_size=sizes["hidden_size"],
        block_weight_bytes=sizes["block_weight_bytes"],
        block_adapter_bytes=sizes["block_adapter_bytes"],
        client_fixed_weight_bytes=sizes["client_fixed_weight_bytes"],
    )
