"""Malformed requests for the 15 RPCs of ``fedsea.v1.Trunk``: the fuzz harness's case generator.

``make_case(rng, target)`` draws one case: an RPC, a family and its request messages as raw
bytes (sent through a raw channel with no serializer, so that undecodable bytes reach the
server as they are). The families:

- ``garbage``: random bytes (0 B to 4 KiB) for every message;
- ``truncated`` / ``bitflip``: a valid message cut short, or with 1 to 8 bits flipped;
- ``hostile``: a decodable message with hostile values (``fuzz_hostile``): dimensions such as
  ``[2^62, 2^62, 0]`` or negative, unknown enums, ``total_bytes`` and offset mismatches, chunks
  out of order, 16 KB session ids, lengths and micro-batch indices out of range, huge LoRA
  ranks and odd target modules, a declared (64, 4096, d) tensor sent 1 KiB of;
- ``halfstream``: a valid stream that ends (half-closes) halfway;
- ``stall``: a valid stream that stops sending halfway and keeps the call open until its
  short deadline (DEADLINE_EXCEEDED is then expected, and not a hang).

Valid messages name the fuzzing client's real session (``Target.session_id``), so that hostile
values get past the session lookup into the tensor, step and generation code. A case is a
function of its ``random.Random`` alone: the same seed gives the same cases.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from fedsea.experiments.fuzz_hostile import CLOSE_OWN_SESSION, hostile_edit
from fedsea.server.handlers import rpc_kinds
from fedsea.wire import fedsea_pb2 as pb

# RPC -> gRPC call kind (which multi-callable of the raw channel sends it), from the proto.
RPCS: dict[str, str] = rpc_kinds()
STREAMING_REQUESTS = {rpc for rpc, kind in RPCS.items() if kind.startswith("stream")}
FAMILIES = ("garbage", "truncated", "bitflip", "hostile", "halfstream", "stall")
_FAMILY_WEIGHTS = (20, 15, 15, 44, 4, 2)
STAGE_KEY = "fuzz/round-1"  # trunk staging's key (no such stage: the fuzzer is no operator)


@dataclass
class Target:
    """What a valid request needs: the fuzzing client's session and the model's shapes.

    Args:
        session_id: an open session of the fuzzing client (p = 1, q = 1, float32 wire).
        hidden_size: d of the served model.
        fingerprint: the served model's base fingerprint (a valid OpenSession names it).
        adapter: the session's trunk adapter tensors, (name, shape), for PutTrunkAdapter.
    """

    session_id: str
    hidden_size: int
    fingerprint: str
    adapter: list[tuple[str, list[int]]] = field(default_factory=list)


@dataclass
class Case:
    """One request: the RPC, how it was made, its messages, and what the call must do.

    ``prep`` is a valid Forward (its step) sent before a Backward case, so that the hostile
    gradient meets a pending activation. ``auth`` is ``fuzzer`` (the valid token), ``none`` or
    ``wrong`` (an unauthenticated peer).
    """

    rpc: str
    family: str
    messages: list[bytes]
    stall: bool = False
    auth: str = "fuzzer"
    prep_forward: tuple[int, list[int]] | None = None  # (step, shape) of a valid Forward to send first
    closes_session: bool = False
    edit: str = ""  # the hostile edit's label (fuzz_hostile), e.g. "chunk.shape" or "open.rank"


def chunk(rng: random.Random, shape: list[int], dtype: pb.DType = pb.FLOAT32) -> pb.TensorChunk:
    """A valid whole tensor of ``shape`` in one chunk (random float32 bytes of small values)."""
    count = 1
    for dim in shape:
        count *= dim
    data = bytes(
        rng.choice((0, 0x3C, 0x3D, 0xBC, 0x3E)) if i % 4 == 3 else rng.randrange(256) for i in range(count * 4)
    )
    return pb.TensorChunk(dtype=dtype, shape=shape, offset=0, data=data, total_bytes=len(data))


def split_chunks(c: pb.TensorChunk, pieces: int) -> list[pb.TensorChunk]:
    """``c`` as ``pieces`` chunks in offset order (each repeating dtype, shape and total_bytes)."""
    size = max(1, -(-len(c.data) // max(1, pieces)))
    out = []
    for start in range(0, max(1, len(c.data)), size):
        part = pb.TensorChunk()
        part.CopyFrom(c)
        part.offset, part.data = start, c.data[start : start + size]
        out.append(part)
    return out


def valid_open(fingerprint: str, seed: int = 0) -> pb.OpenSessionRequest:
    """A valid OpenSession: p = 1, q = 1, rank-4 LoRA on q and v, float32 wire."""
    return pb.OpenSessionRequest(
        base_fingerprint=fingerprint, head_layers=1, tail_layers=1, wire_dtype=pb.FLOAT32, seed=seed,
        trunk_lora=pb.LoraConfig(r=4, alpha=8.0, target_modules=["q_proj", "v_proj"]),
        optimizer=pb.OptimizerConfig(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8),
    )  # fmt: skip


def valid_messages(rpc: str, rng: random.Random, t: Target) -> list[Any]:
    """Valid request message(s) for ``rpc`` on the fuzzing client's session."""
    d, sid = t.hidden_size, t.session_id
    b, n = rng.randint(1, 2), rng.randint(1, 6)
    pieces = rng.randint(1, 3)
    if rpc == "OpenSession":
        return [valid_open(t.fingerprint, rng.randrange(9))]
    if rpc == "CloseSession":
        return [pb.CloseSessionRequest(session_id=f"s-{rng.randrange(10**9)}")]  # not ours: see hostile
    if rpc in ("Forward", "Backward"):
        parts = split_chunks(chunk(rng, [b, n, d]), pieces)
        step = rng.randrange(4)
        if rpc == "Forward":
            lengths = [rng.randint(1, n) for _ in range(b)]
            head = pb.ForwardRequest(session_id=sid, step=step, lengths=lengths, hidden=parts[0])
            return [head, *(pb.ForwardRequest(hidden=p) for p in parts[1:])]
        grad = pb.BackwardRequest(session_id=sid, step=step, update=rng.random() < 0.5, grad=parts[0])
        return [grad, *(pb.BackwardRequest(grad=p) for p in parts[1:])]
    if rpc in ("PutTrunkAdapter", "SubmitUpdate", "StageTrunk"):
        first = STAGE_KEY if rpc == "StageTrunk" else sid  # a stage's key travels in the first session_id
        named = [
            pb.NamedTensorChunk(session_id=first if i == 0 else "", name=name, tensor=chunk(rng, shape))
            for i, (name, shape) in enumerate(t.adapter or [("x.lora_A.weight", [4, d])])
        ]
        if rpc in ("PutTrunkAdapter", "StageTrunk"):
            return named
        return [
            pb.SubmitChunk(round=1, num_samples=3, loss=1.0, tensor=m) if i == 0 else pb.SubmitChunk(tensor=m)
            for i, m in enumerate(named)
        ]
    if rpc == "GetTrunkAdapter":
        return [pb.AdapterRequest(session_id=sid)]
    if rpc == "Generate":
        prefill = pb.GenerateStep(step=0, lengths=[rng.randint(1, n) for _ in range(b)], hidden=chunk(rng, [b, n, d]))
        decode = pb.GenerateStep(step=1, hidden=chunk(rng, [b, 1, d]))
        return [
            pb.GenerateRequest(open=pb.GenerateOpen(session_id=sid, max_length=n + 4)),
            pb.GenerateRequest(step=prefill),
            pb.GenerateRequest(step=decode),
            pb.GenerateRequest(close=pb.GenerateClose()),
        ]
    if rpc == "JoinRun":
        return [pb.JoinRequest(session_id=sid, num_samples=rng.randrange(100))]
    if rpc == "AwaitRound":
        return [pb.RoundRequest(after_round=rng.randrange(3))]
    if rpc == "GetStats":
        return [pb.StatsRequest()]
    if rpc in ("LoadStagedTrunk", "PublishTrunk"):
        return [pb.StagedRequest(session_id=sid, key=STAGE_KEY)]
    if rpc == "CollectTrunk":
        return [pb.CollectRequest(key=STAGE_KEY, client_ids=["fuzzer"][: rng.randrange(2)], drop=rng.random() < 0.5)]
    raise KeyError(rpc)


def truncate(data: bytes, rng: random.Random) -> bytes:
    """``data`` cut at a random point (possibly empty)."""
    return data[: rng.randrange(max(1, len(data)))]


def bitflip(data: bytes, rng: random.Random) -> bytes:
    """``data`` with 1 to 8 random bits flipped."""
    if not data:
        return bytes([rng.randrange(256)])
    out = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(out))
        out[i] ^= 1 << rng.randrange(8)
    return bytes(out)


def garbage(rng: random.Random) -> bytes:
    """Random bytes, 0 B to 4 KiB."""
    size = rng.choice((0, 1, 2, 5, 17, 64, 300, 1024, 4096))
    return bytes(rng.randrange(256) for _ in range(size))


def make_case(rng: random.Random, target: Target) -> Case:
    """One seeded case (see the module docstring for the families)."""
    rpc = rng.choice(list(RPCS))
    family = rng.choices(FAMILIES, _FAMILY_WEIGHTS)[0]
    if family in ("halfstream", "stall") and rpc not in STREAMING_REQUESTS:
        family = "hostile"
    auth = rng.choices(("fuzzer", "none", "wrong"), (95, 3, 2))[0]
    messages = valid_messages(rpc, rng, target)
    case = Case(rpc, family, [], auth=auth)
    if rpc == "Backward" and rng.random() < 0.7:
        case.prep_forward = (int(messages[0].step), list(messages[0].grad.shape))
    if family == "garbage":
        count = rng.randint(1, 3) if rpc in STREAMING_REQUESTS else 1
        case.messages = [garbage(rng) for _ in range(count)]
        return case
    if family == "hostile":
        case.edit = hostile_edit(rpc, messages, rng, target)
        case.closes_session = case.edit == CLOSE_OWN_SESSION
    raw = [m.SerializeToString() for m in messages]
    if family in ("truncated", "bitflip"):
        i = rng.randrange(len(raw))
        raw[i] = truncate(raw[i], rng) if family == "truncated" else bitflip(raw[i], rng)
    elif family in ("halfstream", "stall"):
        raw = raw[: max(1, len(raw) // 2)] if len(raw) > 1 else [truncate(raw[0], rng)]
        case.stall = family == "stall"
    case.messages = raw
    return case
