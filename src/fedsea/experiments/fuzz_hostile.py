"""Hostile values in decodable messages: the fuzz harness's ``hostile`` family (``fuzz_cases``).

Each edit changes one field of a valid request in place, to a value a careless or hostile
client could send and the server must refuse with a status (never INTERNAL, UNKNOWN, a hang or
unbounded memory). The values follow issue 14's findings.
"""

from __future__ import annotations

import random
from typing import Any

from fedsea.wire import fedsea_pb2 as pb

BIG = 2**62
U32, U64 = 2**32 - 1, 2**64 - 1
HOSTILE_DIMS: tuple[list[int], ...] = (
    [BIG, BIG, 0], [0, 0, 0], [0, 4, 64], [-1, 4, 64], [1, -BIG, 64], [1, 1, 2**40], [2**31, 2**31, 2**31],
    [], [1], [1] * 20, [1, 1, 65], [1, 1, 1], [U32, 1, 1], [1, 2**62, 2],
)  # fmt: skip
ODD_TARGETS: tuple[list[str], ...] = (
    [], [""], ["lm_head"], ["embed_tokens"], ["../../etc"], ["x" * 10_000], ["q_proj"] * 1000,
    ["q_proj", "nonexistent"], ["\x00"], ["mlp"], ["layers"], [".*"],
)  # fmt: skip
ODD_IDS = ("", "\x00", "x" * 16 * 1024, "é" * 4000, "../", "s-" + "9" * 64, "\n\r", "null")
CHUNK_EDITS = (
    "shape", "dtype", "total_bytes", "offset", "extra_data", "short_data", "compression", "scales",
    "declared_64x4096xd", "overflowing_shape", "nan", "inf", "zero_dim_consistent",
)  # fmt: skip
OPEN_EDITS = ("layers", "rank", "target_modules", "alpha_dropout", "optimizer", "wire_dtype", "compression",
              "fingerprint", "seed")  # fmt: skip
GENERATE_EDITS = ("max_length", "step_before_open", "open_twice", "rewind", "keep_rows", "close_then_step",
                  "naive_step", "hidden")  # fmt: skip
STEP_EDITS = ("step", "micro_batch", "lengths", "reorder", "step0")
CLOSE_OWN_SESSION = "close_own_session"
FLOATS = (float("nan"), float("inf"), -float("inf"), -1.0, 0.0, 1e308, -1e308, 5e-324, 2.0, 1e38)


def _chunks(messages: list[Any]) -> list[pb.TensorChunk]:
    """Every TensorChunk in the messages (Forward/Backward/Generate steps, adapters, updates)."""
    out = []
    for m in messages:
        for name in ("hidden", "grad", "tensor"):
            if m.DESCRIPTOR.fields_by_name.get(name) is None or not m.HasField(name):
                continue
            inner = getattr(m, name)
            out.append(inner.tensor if isinstance(inner, pb.NamedTensorChunk) else inner)
        if isinstance(m, pb.GenerateRequest) and m.WhichOneof("kind") == "step":
            out.append(m.step.hidden)
    return out


def edit_chunk(c: pb.TensorChunk, rng: random.Random, d: int) -> str:
    """One hostile change to a tensor chunk's header or data; returns its label."""
    what = rng.randrange(len(CHUNK_EDITS))
    if what == 0:
        del c.shape[:]
        c.shape.extend(rng.choice(HOSTILE_DIMS))
    elif what == 1:
        c.dtype = rng.choice((0, 5, 99, 2**31 - 1, pb.BFLOAT16, pb.FLOAT16))  # type: ignore[assignment]
    elif what == 2:
        c.total_bytes = rng.choice((0, 1, c.total_bytes + 1, c.total_bytes - 1 if c.total_bytes else 7, U64, 2**40))
    elif what == 3:
        c.offset = rng.choice((1, 3, c.total_bytes, c.total_bytes + 1, U64, 2**40))
    elif what == 4:
        c.data = c.data + bytes(rng.randint(1, 4096))  # more bytes than declared
    elif what == 5:
        c.data = c.data[: rng.randrange(max(1, len(c.data)))]  # fewer
    elif what == 6:
        c.compression = rng.choice((1, 2, 3, 77))  # type: ignore[assignment]
    elif what == 7:
        c.compression = rng.choice((1, 2))  # type: ignore[assignment]
        c.scales = bytes(rng.choice((0, 3, 4, 4096)))
        c.total_bytes = rng.choice((len(c.data), len(c.data) // 4, U64))
    elif what == 8:  # declared (64, 4096, d), 1 KiB sent: memory must follow the bytes
        del c.shape[:]
        c.shape.extend([64, 4096, d])
        c.total_bytes = 64 * 4096 * d * 4
        c.data = c.data[:1024]
    elif what == 9:  # shape and total_bytes consistent, product overflowing int64
        del c.shape[:]
        c.shape.extend([2**40, 2**40, d])
        c.total_bytes = U64
    elif what == 10:
        c.data = b"\xff\xff\xff\x7f" * max(1, len(c.data) // 4)  # NaN bit patterns
    elif what == 11:
        c.data = b"\x00\x00\x80\x7f" * max(1, len(c.data) // 4)  # +inf
    else:  # zero elements, header consistent: total_bytes 0, no data (issue 14: INTERNAL in Backward)
        del c.shape[:]
        c.shape.extend(rng.choice(([BIG, BIG, 0], [0, 1, d], [1, 0, d], [0])))
        c.total_bytes, c.data = 0, b""
    return "chunk." + CHUNK_EDITS[what]


def _reorder(messages: list[Any], rng: random.Random) -> None:
    """Chunks out of order, duplicated or missing (the first message stays first: it names the session)."""
    if len(messages) < 2:
        return
    rest = messages[1:]
    what = rng.randrange(3)
    if what == 0:
        rest.reverse()
    elif what == 1:
        rest.append(rest[0])
    else:
        rest.pop(rng.randrange(len(rest)))
    messages[1:] = rest
    if rng.random() < 0.3:
        messages[0], messages[-1] = messages[-1], messages[0]


def hostile_edit(rpc: str, messages: list[Any], rng: random.Random, t: Any) -> str:
    """Apply one hostile edit to ``messages`` (in place); returns its label (``CLOSE_OWN_SESSION``:
    the request closes the fuzzing client's own session)."""
    first = messages[0]
    roll = rng.random()
    if roll < 0.12 and first.DESCRIPTOR.fields_by_name.get("session_id") is not None:
        first.session_id = rng.choice(ODD_IDS)
        return "odd_session_id"
    if rpc == "CloseSession":
        first.session_id = t.session_id if roll < 0.5 else rng.choice(ODD_IDS)
        return CLOSE_OWN_SESSION if first.session_id == t.session_id else "odd_session_id"
    if rpc == "OpenSession":
        return _edit_open(first, rng)
    if rpc == "Generate":
        return _edit_generate(messages, rng, t.hidden_size)
    if rpc == "AwaitRound":
        first.after_round = rng.choice((U32, 0, 2**31))
        return "after_round"
    if rpc == "JoinRun":
        first.num_samples = rng.choice((U64, 0, 2**63))
        return "num_samples"
    if rpc in ("Forward", "Backward") and roll < 0.45:
        what = rng.randrange(5)
        if what == 0:
            first.step = rng.choice((U64, 2**63, 10**6))
        elif what == 1:
            first.micro_batches, first.micro_batch = rng.choice(((2, 5), (U32, 0), (2, 2), (0, 3), (U32, U32 - 1)))
        elif what == 2 and rpc == "Forward":
            del first.lengths[:]
            first.lengths.extend(rng.choice(([], [0], [U32], [1] * 100, [0, 0], [2**31])))
        elif what == 3:
            _reorder(messages, rng)
        else:
            first.step = 0
        return "step." + ("step0" if what == 2 and rpc != "Forward" else STEP_EDITS[what])
    if rpc == "SubmitUpdate" and roll < 0.4:
        first.round, first.loss = rng.choice((0, U32)), rng.choice(FLOATS)
        first.num_samples = rng.choice((0, U64))
        return "submit_header"
    if rpc in ("LoadStagedTrunk", "PublishTrunk", "CollectTrunk") and roll < 0.6:
        first.key = rng.choice((*ODD_IDS, "a" * 129, "run/../x", "k" * 128))
        return "stage_key"
    if rpc in ("PutTrunkAdapter", "SubmitUpdate", "StageTrunk") and roll < 0.6:
        named = [m if isinstance(m, pb.NamedTensorChunk) else m.tensor for m in messages]
        target = rng.choice(named)
        target.name = rng.choice(("", "x" * 16 * 1024, "base_model.weight", "lm_head.weight", named[0].name, "é"))
        if rng.random() < 0.3:
            _reorder(messages, rng)
        return "tensor_name"
    chunks = _chunks(messages)
    return edit_chunk(rng.choice(chunks), rng, t.hidden_size) if chunks else "none"


def _edit_open(m: pb.OpenSessionRequest, rng: random.Random) -> str:
    what = rng.randrange(9)
    if what == 0:
        m.head_layers, m.tail_layers = rng.choice(((0, 1), (1, 0), (3, 3), (U32, 1), (1, U32), (4, 0), (2, 2), (0, 0)))
    elif what == 1:
        # Ranks whose (r, d) matrices cannot be allocated at all: they fail at once. A rank that
        # fits but fills memory (r = 200,000) is test_memory_ceiling's, not the fuzz's.
        m.trunk_lora.r = rng.choice((0, U32, 2**31, 2**30))
    elif what == 2:
        del m.trunk_lora.target_modules[:]
        m.trunk_lora.target_modules.extend(rng.choice(ODD_TARGETS))
    elif what == 3:
        m.trunk_lora.alpha, m.trunk_lora.dropout = rng.choice(FLOATS), rng.choice(FLOATS)
    elif what == 4:
        o = m.optimizer
        o.lr, o.weight_decay, o.beta1, o.beta2, o.eps, o.max_grad_norm = (rng.choice(FLOATS) for _ in range(6))
    elif what == 5:
        m.wire_dtype = rng.choice((0, 4, 99, 2**31 - 1))  # type: ignore[assignment]
    elif what == 6:
        m.wire_compression = rng.choice((3, 99, 2**31 - 1))  # type: ignore[assignment]
    elif what == 7:
        m.base_fingerprint = rng.choice(("", "x" * 16 * 1024, "sha256:" + "0" * 64, "\x00"))
    else:
        m.seed = rng.choice((U64, 2**63))
    return "open." + OPEN_EDITS[what]


def _edit_generate(messages: list[Any], rng: random.Random, d: int) -> str:
    what = rng.randrange(8)
    opener = messages[0].open
    if what == 0:
        opener.max_length = rng.choice((0, 1, U32, 2**31))
    elif what == 1:
        messages.pop(0)  # a step before any open
    elif what == 2:
        messages.insert(1, messages[0])  # opened twice
    elif what == 3:
        messages.insert(2, pb.GenerateRequest(rewind=pb.GenerateRewind(length=rng.choice((0, U32, 10_000)))))
    elif what == 4:
        messages[2].step.keep_rows.extend(rng.choice(([5], [U32], [0, 0, 0], [1, 0])))
    elif what == 5:
        messages.insert(1, pb.GenerateRequest(close=pb.GenerateClose()))  # close, then steps
    elif what == 6:
        opener.naive = True
        messages[1].step.step = rng.choice((U64, 5))
    else:
        step = messages[rng.choice((1, 2))].step
        label = edit_chunk(step.hidden, rng, d)
        if rng.random() < 0.3:
            del step.lengths[:]
            step.lengths.extend(rng.choice(([], [0], [U32], [1] * 100)))
        return "generate." + label
    return "generate." + GENERATE_EDITS[what]
