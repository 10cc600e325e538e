"""Frozen, validated configuration records.

Every config is a frozen dataclass that checks itself in ``__post_init__`` and raises
``ValueError`` naming the field and the bad value. The CLI builds these objects; it
never keeps a second list of defaults.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from fedsea.limits import ServerLimits as ServerLimits  # re-exported: its home before issue 14
from fedsea.settings import ZERO_IS_NONE

# The recommended default noise (PRIVACY.md, "Recommended default"): sigma as a multiple of
# h_p's per-coordinate RMS on public calibration text (``fedsea.privacy.calibration``). Run
# files and ``fedsea train`` use it unless told otherwise; the Python API's ``NoiseConfig()``
# stays noise-free so that split == centralized holds by default.
RECOMMENDED_RELATIVE_SIGMA = 0.14

# The dtypes hidden states and gradients may cross the wire in.
WIRE_DTYPES: tuple[str, ...] = ("fp32", "bf16", "fp16")

# What ``wire.dtype`` may say: a wire dtype, or ``auto`` for the model's own dtype.
WIRE_DTYPE_SETTINGS: tuple[str, ...] = ("auto", *WIRE_DTYPES)

# Optional lossy compression of the tensors on the wire (``fedsea.wire.compress``); none: exact.
WIRE_COMPRESSIONS: tuple[str, ...] = ("none", "int8", "fp8")

# Device and dtype specs (``Placement``; resolved against the hardware by ``fedsea.model.device``).
DEVICE_SPECS = "auto, cpu, cuda, cuda:N or mps"
_DEVICE_SPEC = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
DTYPE_SPECS: tuple[str, ...] = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")

# The paper's LoRA targets (q, k, v, o projections of every attention block).
DEFAULT_TARGETS: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")


def _check(cond: bool, name: str, value: object, need: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {need}, got {value!r}")


def check_device_spec(spec: str, name: str = "device") -> str:
    """``spec`` if it is a well-formed device spec (the hardware is not consulted); ``ValueError`` otherwise."""
    _check(isinstance(spec, str) and bool(_DEVICE_SPEC.match(spec.strip().lower())), name, spec, DEVICE_SPECS)
    return spec


def check_dtype_spec(spec: str, name: str = "dtype") -> str:
    """``spec`` if it names a model dtype or ``auto``; ``ValueError`` otherwise."""
    need = "auto, float32 (fp32), bfloat16 (bf16) or float16 (fp16)"
    _check(isinstance(spec, str) and spec.strip().lower() in DTYPE_SPECS, name, spec, need)
    return spec


@dataclass(frozen=True)
class Placement:
    """Where a party runs its model, and in which dtype.

    Args:
        device (`str`, defaults to "auto"): auto (the first GPU, else the CPU; on the trunk server,
            every visible GPU, the blocks spread over them), cpu, cuda, cuda:N or mps.
        dtype (`str`, defaults to "auto"): the model's dtype: auto (bfloat16 on CUDA, float32
            elsewhere), float32, bfloat16 or float16 (also fp32, bf16, fp16).
    """

    device: str = "auto"
    dtype: str = "auto"

    def __post_init__(self) -> None:
        check_device_spec(self.device)
        check_dtype_spec(self.dtype)


@dataclass(frozen=True)
class LoraSpec:
    """LoRA settings of one part (head, trunk or tail).

    Args:
        r (`int`, defaults to 8): rank of the update ``B @ A``.
        alpha (`float`, defaults to 16): scaling numerator; the update is scaled by ``alpha / r``.
        dropout (`float`, defaults to 0.05): dropout on the LoRA branch's input, in [0, 1).
        target_modules (`tuple[str, ...]`): names of the linear layers to adapt, matched
            by suffix as in peft (``q_proj`` matches ``layers.3.self_attn.q_proj``).
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self) -> None:
        _check(isinstance(self.r, int) and self.r >= 1, "r", self.r, "an integer >= 1")
        _check(math.isfinite(self.alpha) and self.alpha > 0, "alpha", self.alpha, "a positive number")
        _check(0.0 <= self.dropout < 1.0, "dropout", self.dropout, "in [0, 1)")
        # Lists would make the record unhashable and mutable: coerce once, loudly typed.
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        _check(
            len(self.target_modules) > 0 and all(isinstance(t, str) and t for t in self.target_modules),
            "target_modules",
            self.target_modules,
            "a non-empty sequence of module names",
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain data (target modules as a list), for JSON next to saved adapters."""
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d

    def summary(self) -> str:
        """``r=8 alpha=16.0 on q_proj, k_proj, ...``: the spec in one line (reports)."""
        return f"r={self.r} alpha={self.alpha} on {', '.join(self.target_modules)}"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoraSpec:
        """The spec saved by ``to_dict`` (adapter folders, checkpoints)."""
        return cls(
            r=int(d["r"]),
            alpha=float(d["alpha"]),
            dropout=float(d["dropout"]),
            target_modules=tuple(d["target_modules"]),
        )


@dataclass(frozen=True)
class SplitLora:
    """LoRA settings of the three parts; ``None`` leaves a part without an adapter."""

    head: LoraSpec | None = field(default_factory=LoraSpec)
    trunk: LoraSpec | None = field(default_factory=LoraSpec)
    tail: LoraSpec | None = field(default_factory=LoraSpec)

    @classmethod
    def uniform(cls, spec: LoraSpec) -> SplitLora:
        """The same spec on the head, the trunk and the tail."""
        return cls(head=spec, trunk=spec, tail=spec)

    @property
    def uniform_spec(self) -> LoraSpec | None:
        """The one spec of all three parts when they are equal; None when they differ (or have none)."""
        return self.head if self.head == self.trunk == self.tail else None

    def summary(self) -> str:
        """The parts' specs in one line: one spec when they are equal, else each part's."""
        if self.uniform_spec is not None:
            return self.uniform_spec.summary()
        return "; ".join(
            f"{name} {spec.summary() if spec is not None else 'none'}"
            for name, spec in (("head", self.head), ("trunk", self.trunk), ("tail", self.tail))
        )


@dataclass(frozen=True)
class SplitConfig:
    """Where a client cuts the model: the head holds blocks [0, p), the tail the last q.

    Args:
        head_layers (`int`, defaults to 2): p, the blocks on the client before the trunk (>= 1).
        tail_layers (`int`, defaults to 2): q, the blocks on the client after the trunk (>= 1).
    """

    head_layers: int = 2
    tail_layers: int = 2

    def __post_init__(self) -> None:
        for name in ("head_layers", "tail_layers"):
            value = getattr(self, name)
            _check(
                isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, value, "an integer >= 1"
            )


@dataclass(frozen=True)
class WireConfig:
    """How a client's hidden states travel to the trunk server.

    Args:
        dtype (`str`, defaults to "auto"): the dtype of the tensors on the wire: fp32, bf16, fp16, or
            auto: the model's dtype (a bfloat16 model sends bf16, a float32 one fp32).
        latency_ms (`float`, defaults to 0): emulated one-way latency added to each message, in ms.
        mbps (`float | None`): emulated bandwidth in megabits per second; unset: unlimited.
        compression (`str`, defaults to "none"): lossy compression of hidden states and gradients
            on the wire, one byte per element with a float32 scale per token: none (exact), int8
            (error <= 1/254 of the token's largest value) or fp8 (e4m3: <= 1/16 of each value).
            Half the bytes of bf16, a quarter of fp32, for more CPU time: it pays on slow links only.
    """

    dtype: str = "auto"
    latency_ms: float = 0.0
    mbps: float | None = field(default=None, metadata={ZERO_IS_NONE: True})
    compression: str = "none"

    def __post_init__(self) -> None:
        _check(self.dtype in WIRE_DTYPE_SETTINGS, "dtype", self.dtype, "one of " + ", ".join(WIRE_DTYPE_SETTINGS))
        _check(math.isfinite(self.latency_ms) and self.latency_ms >= 0, "latency_ms", self.latency_ms, ">= 0")
        if self.mbps is not None:
            _check(math.isfinite(self.mbps) and self.mbps > 0, "mbps", self.mbps, "> 0 or unset (unlimited)")
        need = "one of " + ", ".join(WIRE_COMPRESSIONS)
        _check(self.compression in WIRE_COMPRESSIONS, "compression", self.compression, need)


@dataclass(frozen=True)
class NoiseConfig:
    """Gaussian noise on the head's output h_p before it leaves the client.

    Args:
        sigma (`float`, defaults to 0): standard deviation of the noise, per coordinate.
            Note: the seed paper's code configures the *mean absolute value* of the noise;
            fedsea's sigma is the standard deviation (std = mean|n| * sqrt(pi / 2)).
        clip_norm (`float | None`): if set, each token's vector is scaled down to at most this
            L2 norm before the noise is added (bounds the sensitivity for an accountant).
        seed (`int | None`): seed of the noise generator; ``None`` draws one from the OS.
    """

    sigma: float = 0.0
    clip_norm: float | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        _check(math.isfinite(self.sigma) and self.sigma >= 0, "sigma", self.sigma, "a finite number >= 0")
        if self.clip_norm is not None:
            _check(
                math.isfinite(self.clip_norm) and self.clip_norm > 0,
                "clip_norm",
                self.clip_norm,
                "a finite number > 0 or None",
            )

    @property
    def enabled(self) -> bool:
        """True when the mechanism changes h_p at all (noise or clipping)."""
        return self.sigma > 0 or self.clip_norm is not None


@dataclass(frozen=True)
class OptimConfig:
    """AdamW settings shared by every part (the paper's: betas 0.9/0.999, eps 1e-5, wd 0.01).

    Args:
        lr (`float`): learning rate.
        weight_decay (`float`): decoupled weight decay.
        betas (`tuple[float, float]`): Adam moments' decay rates.
        eps (`float`): Adam's epsilon.
        max_grad_norm (`float | None`): clip each part's gradient to this L2 norm (per part, so
            that a split step and a centralized step clip identically); ``None`` (0 in a run file) disables.
        proximal_mu (`float`): FedProx's proximal term (Li et al. 2020), ``mu/2 ||w - w_0||^2`` added
            to each part's loss, ``w_0`` its LoRA tensors when the optimizer was made (a federated
            round's global adapter: head and tail on the client, the trunk on the server, which
            gets ``mu`` with the session's optimizer settings). 0 (the default): plain FedAvg.
    """

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-5
    max_grad_norm: float | None = field(default=1.0, metadata={ZERO_IS_NONE: True})
    proximal_mu: float = 0.0

    def __post_init__(self) -> None:
        _check(math.isfinite(self.lr) and self.lr > 0, "lr", self.lr, "a positive number")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, ">= 0")
        _check(all(0 <= b < 1 for b in self.betas), "betas", self.betas, "two numbers in [0, 1)")
        _check(self.eps > 0, "eps", self.eps, "> 0")
        if self.max_grad_norm is not None:
            _check(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "> 0 or None")
        _check(math.isfinite(self.proximal_mu) and self.proximal_mu >= 0, "proximal_mu", self.proximal_mu, ">= 0")
