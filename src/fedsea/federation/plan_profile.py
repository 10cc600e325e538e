"""One party's measured compute per block, the input of ``fedsea plan`` (``fedsea.federation.planner``).

A split training step runs these segments in turn (``fedsea.training.step.SplitTrainer``):

    client  head forward: embedding, p blocks, noise on h_p         -> h~_p (B, n, d) up
    server  trunk forward: L - p - q blocks                          -> h_{L-q} (B, n, d) down
    client  tail forward: q blocks, final norm, LM head, loss; tail backward -> dL/dh_{L-q} up
    server  trunk backward, then the trunk adapter's AdamW step      -> dL/dh~_p down
    client  head backward, then the head and tail adapters' AdamW steps

The blocks of one model are alike, so each segment's time is a line in its block count: a fixed
part (the embedding; the norm, LM head and loss; masks and rotary tables per call) plus one
block's time per block. ``measure_profile`` runs real steps of the run's batch and length at two
cuts far apart, (1, 1) and about (L/3, L/3), times every segment (medians over repeats) and fits
the lines; the same is done for the bytes autograd keeps for the backward (from
``saved_tensors_hooks``), and the wire's encode and decode of one (B, n, d) message is timed
(``fedsea.federation.plan_measure``).
Whoever runs the trunk profiles on the server, each client on its own machine; on one machine
one profile serves both.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedsea.io import atomic_write_text, read_json

PROFILE_KIND = "fedsea-plan-profile"
PROFILE_VERSION = 1
# The segments timed in a step, each a line in the blocks of its part (see the module docstring).
SEGMENTS: tuple[str, ...] = (
    "head_forward",
    "head_backward",
    "tail_forward",
    "tail_backward",
    "client_optimizer",
    "trunk_forward",
    "trunk_backward",
    "trunk_optimizer",
)
# Which part's block count each segment scales with ("client": head + tail blocks).
SEGMENT_PART: dict[str, str] = {
    "head_forward": "head",
    "head_backward": "head",
    "tail_forward": "tail",
    "tail_backward": "tail",
    "client_optimizer": "client",
    "trunk_forward": "trunk",
    "trunk_backward": "trunk",
    "trunk_optimizer": "trunk",
}
MEMORY_PARTS: tuple[str, ...] = ("head", "tail", "trunk")


@dataclass(frozen=True)
class Line:
    """``fixed + per_block * blocks`` (seconds, or bytes for memory)."""

    fixed: float
    per_block: float

    def at(self, blocks: int) -> float:
        """The line's value at ``blocks``."""
        return self.fixed + self.per_block * blocks

    @staticmethod
    def fit(x0: int, y0: float, x1: int, y1: float, slope: float | None = None) -> Line:
        """The line through (x0, y0) and (x1, y1); where x0 == x1, the given ``slope`` through (x0, y0).

        Timing noise can tilt a short line: a slope under 0 is taken as 0 and a fixed part under 0
        as 0 (the line then goes through the mean point as near as it can).
        """
        if x1 != x0:
            per_block = (y1 - y0) / (x1 - x0)
        elif slope is not None:
            per_block = slope
        else:
            raise ValueError("two different block counts, or a slope, are needed to fit a line")
        per_block = max(0.0, per_block)
        fixed = max(0.0, (y0 + y1) / 2 - per_block * (x0 + x1) / 2)
        return Line(fixed, per_block)


@dataclass(frozen=True)
class PartyProfile:
    """What one machine measured for one model at one batch shape (JSON: ``save_profile``).

    Args:
        model: the model source profiled.
        num_layers: L, the model's blocks.
        hidden_size: d.
        batch: B, sequences per step.
        tokens: n, tokens per sequence.
        device: where it ran (``cpu``, ``cuda:0``, ...).
        dtype: the model's dtype.
        wire_dtype: the dtype of the messages (fp32, bf16, fp16).
        lora_r: the LoRA rank of the trunk.
        lora: the LoRA of the parts in one line (``SplitLora.summary``): a profile serves runs with the same.
        compression: the wire's lossy compression (``none``, ``int8``, ``fp8``): one byte per element
            and one float32 scale per token instead of the wire dtype's bytes.
        host: the machine's name, and its torch threads, for the record.
        seconds: per segment (``SEGMENTS``), its line in the blocks of its part.
        activation_bytes: per part (``MEMORY_PARTS``), the bytes autograd keeps for the backward.
        block_weight_bytes: one block's base weights.
        block_adapter_bytes: one block's LoRA tensors.
        client_fixed_weight_bytes: the embedding, the final norm and (when untied) the LM head.
        codec_s: encoding plus decoding one (B, n, d) message (both ends together, one message).
        created: Unix time of the measurement.
        link_server: the server whose link was measured (``fedsea profile --server``), if any.
        link_latency_ms: that link's one-way latency.
        link_mbps: that link's bandwidth (None: unlimited, or not measured).
        memory_bytes: the memory the party had free on its device before profiling (the GPU's free
            memory, or the host's available memory); None: unknown.
    """

    model: str
    num_layers: int
    hidden_size: int
    batch: int
    tokens: int
    device: str
    dtype: str
    wire_dtype: str
    lora_r: int
    host: str
    seconds: dict[str, Line]
    activation_bytes: dict[str, Line]
    block_weight_bytes: int
    block_adapter_bytes: int
    client_fixed_weight_bytes: int
    codec_s: float
    created: float
    lora: str = ""
    compression: str = "none"
    link_server: str | None = None
    link_latency_ms: float | None = None
    link_mbps: float | None = None
    memory_bytes: int | None = None

    def __post_init__(self) -> None:
        missing = [s for s in SEGMENTS if s not in self.seconds] + [
            p for p in MEMORY_PARTS if p not in self.activation_bytes
        ]
        if missing:
            raise ValueError(f"profile lacks {', '.join(missing)}: measure it again with `fedsea profile`")
        if self.wire_dtype not in _WIRE_ITEMSIZE:
            raise ValueError(f"profile has wire dtype {self.wire_dtype!r}, not one of {', '.join(_WIRE_ITEMSIZE)}")
        sizes = (self.num_layers, self.hidden_size, self.batch, self.tokens)
        if not all(isinstance(v, int) and v >= 1 for v in sizes):
            raise ValueError(f"profile has layers, width, batch and tokens {sizes}: all must be integers >= 1")

    @property
    def message_bytes(self) -> int:
        """Bytes of one (B, n, d) message: the wire dtype's, or compressed, a byte each and a scale per token."""
        elements = self.batch * self.tokens * self.hidden_size
        if self.compression != "none":
            return elements + 4 * self.batch * self.tokens
        return elements * _WIRE_ITEMSIZE[self.wire_dtype]

    def to_dict(self) -> dict[str, Any]:
        """Plain data (``save_profile`` writes it as JSON)."""
        return {"kind": PROFILE_KIND, "version": PROFILE_VERSION, **dataclasses.asdict(self)}

    @staticmethod
    def from_dict(data: dict[str, Any], where: str = "profile") -> PartyProfile:
        """The profile in ``data`` (``to_dict``'s); ``where`` names it in errors."""
        if data.get("kind") != PROFILE_KIND:
            raise ValueError(f"{where} is not a fedsea plan profile (make one with `fedsea profile --out FILE`)")
        if data.get("version") != PROFILE_VERSION:
            raise ValueError(f"{where} has profile version {data.get('version')}, this fedsea reads {PROFILE_VERSION}")
        fields = {f.name for f in dataclasses.fields(PartyProfile)}
        given = {k: v for k, v in data.items() if k in fields}
        try:
            given["seconds"] = {k: Line(**v) for k, v in given["seconds"].items()}
            given["activation_bytes"] = {k: Line(**v) for k, v in given["activation_bytes"].items()}
            return PartyProfile(**given)
        except (KeyError, TypeError, AttributeError) as exc:
            raise ValueError(f"{where} is not a complete profile ({exc}): measure it again") from exc


_WIRE_ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def save_profile(profile: PartyProfile, path: str | os.PathLike[str]) -> Path:
    """Write ``profile`` as JSON, atomically; returns the path."""
    atomic_write_text(path, json.dumps(profile.to_dict(), indent=2) + "\n")
    return Path(path)


def load_profile(path: str | os.PathLike[str]) -> PartyProfile:
    """Read a profile written by ``save_profile`` (a clear ``ValueError`` for anything else)."""
    data = read_json(path, "give a profile written by `fedsea profile`")
    if not isinstance(data, dict):
        raise ValueError(f"{path} is not a fedsea plan profile")
    return PartyProfile.from_dict(data, str(path))


def profile_cuts(num_layers: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two cuts profiled: (1, 1) and about (L/3, L/3), so that each part's block count changes a lot."""
    if num_layers < 4:
        raise ValueError(f"profiling needs a model of at least 4 blocks (two cuts with a trunk), got {num_layers}")
    k = max(1, (num_layers - 3) // 3)  # trunk: L - 2 blocks at (1, 1), L - 2 - 2k >= 1 at the second cut
    return (1, 1), (1 + k, 1 + k) if num_layers - 2 - 2 * k >= 1 else (2, 1)
