"""Settings <-> protobuf messages: LoRA, optimizer, wire dtype and compression, server limits, traffic stats.

Both ends convert through here, so a field added to a config or a message is mapped once.
Decoding a client's request checks it: a bad value raises ``InvalidInputError`` naming the
field, which the servicer turns into INVALID_ARGUMENT.
"""

from __future__ import annotations

from typing import Any

from fedsea.config import LoraSpec, OptimConfig, ServerLimits
from fedsea.errors import InvalidInputError
from fedsea.wire import fedsea_pb2 as pb
from fedsea.wire.compress import COMPRESSIONS
from fedsea.wire.tensors import ITEMSIZE


def lora_to_pb(spec: LoraSpec) -> pb.LoraConfig:
    """A LoRA spec as its message."""
    return pb.LoraConfig(r=spec.r, alpha=spec.alpha, dropout=spec.dropout, target_modules=list(spec.target_modules))


def lora_from_pb(message: pb.LoraConfig) -> LoraSpec:
    """A LoRA spec from its message (``ValueError`` when the spec refuses a value)."""
    return LoraSpec(
        r=int(message.r),
        alpha=float(message.alpha),
        dropout=float(message.dropout),
        target_modules=tuple(message.target_modules),
    )


def optim_to_pb(optim: OptimConfig) -> pb.OptimizerConfig:
    """Optimizer settings as their message (no gradient clipping travels as 0)."""
    return pb.OptimizerConfig(
        lr=optim.lr,
        weight_decay=optim.weight_decay,
        beta1=optim.betas[0],
        beta2=optim.betas[1],
        eps=optim.eps,
        max_grad_norm=optim.max_grad_norm or 0.0,
        proximal_mu=optim.proximal_mu,
    )


def optim_from_pb(message: pb.OptimizerConfig) -> OptimConfig:
    """Optimizer settings from their message (``ValueError`` when the config refuses a value)."""
    return OptimConfig(
        lr=message.lr,
        weight_decay=message.weight_decay,
        betas=(message.beta1, message.beta2),
        eps=message.eps,
        max_grad_norm=message.max_grad_norm if message.max_grad_norm > 0 else None,
        proximal_mu=message.proximal_mu,
    )


def session_settings(request: pb.OpenSessionRequest) -> tuple[LoraSpec, OptimConfig, int, int]:
    """The trunk LoRA, optimizer, wire dtype and wire compression a client asks for, checked."""
    try:
        lora, optim = lora_from_pb(request.trunk_lora), optim_from_pb(request.optimizer)
    except ValueError as exc:
        raise InvalidInputError("open_session", str(exc)) from exc
    if request.wire_dtype not in ITEMSIZE:
        raise InvalidInputError("wire_dtype", f"unknown wire dtype {request.wire_dtype} (expected fp32, bf16 or fp16)")
    if request.wire_compression not in COMPRESSIONS.values():  # fp8 needs a torch that has it
        names = ", ".join(COMPRESSIONS)
        raise InvalidInputError("wire_compression", f"unknown {request.wire_compression} (expected {names})")
    return lora, optim, int(request.wire_dtype), int(request.wire_compression)


def limits_to_pb(limits: ServerLimits) -> pb.Limits:
    """The limits a client is told when its session opens."""
    return pb.Limits(
        max_seq_len=limits.max_seq_len,
        max_batch=limits.max_batch,
        max_message_bytes=limits.max_message_bytes,
        max_sessions_per_client=limits.max_sessions_per_client,
        idle_timeout_s=limits.idle_timeout_s,
    )


def rpc_stats_to_pb(rpcs: dict[str, dict[str, Any]]) -> list[pb.RpcStats]:
    """A ``TrafficMeter``'s per-RPC counters as messages."""
    return [
        pb.RpcStats(
            rpc=name,
            calls=c["calls"],
            bytes_received=c["bytes_received"],
            bytes_sent=c["bytes_sent"],
            compute_s=c["compute_s"],
        )
        for name, c in rpcs.items()
    ]


def rpc_stats_from_pb(rpcs: Any) -> dict[str, dict[str, Any]]:
    """Per-RPC counters from their messages (the inverse of ``rpc_stats_to_pb``)."""
    return {
        r.rpc: {
            "calls": r.calls,
            "bytes_received": r.bytes_received,
            "bytes_sent": r.bytes_sent,
            "compute_s": r.compute_s,
        }
        for r in rpcs
    }
