"""``ServerLimits``: what the trunk server enforces on every client (re-exported by ``fedsea.config``).

Issue 14 made memory follow bytes: nothing is allocated from a size a client declares, only
for bytes that arrived, and every kind of memory a client can make the server hold has a
budget per client and in all (in-flight request tensors, pending activations, adapters,
generation streams and their KV caches), each refused with RESOURCE_EXHAUSTED naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

GIB = 1024**3
MIB = 1024**2

# The memory budgets left at 0 ("auto") are these shares of the memory free for them when the
# trunk server starts (``ServerLimits.sized``): what the trunk's devices have beside its weights.
# Fixed byte defaults cannot fit both a CPU server of SmolLM2-135M and an 80 GB GPU serving a 7B
# trunk (whose batch of 4 x 512 tokens saves 11.3 GB of activations). On the 24 GiB CPU machine
# the shares give about what the fixed defaults were (8 / 16 GiB pending, 1 / 4 GiB KV cache).
# Pending activations and KV caches together take 5/6; the rest is left for transient buffers.
AUTO_SHARES = {
    "max_pending_bytes_per_client": 1 / 3,
    "max_pending_bytes": 2 / 3,
    "max_cache_bytes": 1 / 6,
    "max_cache_bytes_per_client": 1 / 24,
}


def _check(cond: bool, name: str, value: object, need: str) -> None:
    if not cond:
        raise ValueError(f"{name} must be {need}, got {value!r}")


@dataclass(frozen=True)
class ServerLimits:
    """Limits the trunk server enforces; going over one is RESOURCE_EXHAUSTED.

    Args:
        max_seq_len (`int`): longest padded sequence (tokens) in one request.
        max_batch (`int`): most sequences in one request.
        max_message_bytes (`int`): largest gRPC message (one chunk) accepted, in bytes.
        max_tensor_bytes (`int`): largest tensor (all its chunks together), in bytes.
        max_sessions_per_client (`int`): open sessions one client may hold at once.
        max_sessions (`int`): open sessions on the server in all.
        idle_timeout_s (`float`): a session unused this long is closed and its memory freed.
        max_generation_sessions (`int`): open inference streams on the server in all.
        max_cache_bytes (`int`): KV-cache memory budget of all inference streams together; a
            stream reserves its worst case (batch x max_length) when it starts, or is refused.
            0 (the default) = auto: 1/6 of the memory free beside the trunk's weights.
        stream_timeout_s (`float`): longest wait for the next message of a request stream that
            carries a tensor or adapter (Forward, Backward, PutTrunkAdapter, SubmitUpdate, the
            chunks of a Generate step); past it the stream is refused (DEADLINE_EXCEEDED) and
            its buffers freed. A gap, not a whole-stream deadline: one 1 MiB chunk takes 8 s at 1 Mbit/s.
        max_inflight_bytes_per_client (`int`): tensor bytes one client's partial request streams
            may hold on the server at once (counted as they arrive).
        max_inflight_bytes (`int`): tensor bytes all partial request streams may hold at once.
        max_pending_bytes_per_client (`int`): activation bytes one client's forwards awaiting
            their backward may hold (the autograd graph's saved tensors, measured; a forward
            expected to pass it is refused before it computes). 0 (the default) = auto: 1/3 of the
            memory free beside the trunk's weights.
        max_pending_bytes (`int`): activation bytes all pending forwards may hold at once.
            0 (the default) = auto: 2/3 of the memory free beside the trunk's weights.
        pending_timeout_s (`float`): a forward's activations are dropped when its backward has
            not come this long after it; that backward is refused (FAILED_PRECONDITION: resend the forward).
        max_lora_rank (`int`): largest trunk LoRA rank r a session may ask for.
        max_lora_targets (`int`): most target module names in a session's trunk LoRA.
        max_adapter_bytes (`int`): largest trunk adapter per session (float32 A and B of every
            targeted layer, counted before it is made), and largest adapter state one
            PutTrunkAdapter or SubmitUpdate stream may carry (counted as it arrives).
        max_generation_sessions_per_client (`int`): open inference streams one client may hold.
        max_cache_bytes_per_client (`int`): KV-cache bytes one client's streams may reserve.
            0 (the default) = auto: 1/24 of the memory free beside the trunk's weights (a
            quarter of the auto ``max_cache_bytes``).
        max_stages (`int`): trunk adapter stages (``StageTrunk``, Flower runs: one global trunk
            adapter per key) the server holds at once; a new key past it is refused. 16 leaves
            room for a few runs with a round or two in flight each.
        max_staged_bytes (`int`): bytes of all staged and published trunk adapters together
            (``fedsea.server.staging``; each state also at most ``max_adapter_bytes``). 4 GiB: a
            whole float32 adapter with r=8 on q/k/v/o is 3.7 MB for SmolLM2-135M and 34 MB for
            LLaMA-7B, so a round of dozens of clients fits; the states are in CPU memory.
        Stages and published states unused for ``idle_timeout_s`` are freed (a stage is kept
        while a session that loaded it is open).
        max_joint_tokens (`int`): most tokens (rows x new tokens) one joint trunk pass of several
            inference streams may carry (``fedsea.server.multitenant``); a step over it runs alone.
            It bounds the pass's activations beside the streams' KV caches, which are not copied
            (2048 tokens of a 7B trunk in bf16 are ~0.2 GB of MLP activations) and how long a
            decode step may wait behind other streams' prefills. 1 turns joint passes off.
        joint_wait_ms (`float`): how long the scheduler holds a pass for more streams' steps when
            fewer have arrived than streams are generating; 0 (the default) runs at once with what
            has queued while the previous pass computed (continuous batching, no window).

    The memory free beside the weights is measured when the server starts (``sized``): on CUDA
    what ``torch.cuda.mem_get_info`` reports free on the trunk's GPUs after loading it, on the CPU
    the machine's RAM less the weights. The server logs the budgets it resolved.
    """

    max_seq_len: int = 4096
    max_batch: int = 64
    max_message_bytes: int = 4 * MIB
    max_tensor_bytes: int = 512 * MIB
    max_sessions_per_client: int = 8
    max_sessions: int = 256
    idle_timeout_s: float = 600.0
    max_generation_sessions: int = 64
    max_cache_bytes: int = 0  # auto (AUTO_SHARES)
    stream_timeout_s: float = 30.0
    max_inflight_bytes_per_client: int = 1 * GIB
    max_inflight_bytes: int = 2 * GIB
    # Auto (AUTO_SHARES). SmolLM2-135M (fp32, CPU, 26 trunk blocks, r=8 on q/k/v/o, dropout 0.05)
    # saves 1.19 MB of activations per token: fedsea's fine-tuning default of 8 x 768 tokens is
    # 7.3 GB, which one client must be able to hold (1/3 of a 24 GiB machine is 7.8 GiB).
    max_pending_bytes_per_client: int = 0
    max_pending_bytes: int = 0
    pending_timeout_s: float = 300.0
    max_lora_rank: int = 256
    max_lora_targets: int = 16
    max_adapter_bytes: int = 1 * GIB
    max_generation_sessions_per_client: int = 16
    max_cache_bytes_per_client: int = 0  # auto (AUTO_SHARES)
    max_stages: int = 16
    max_staged_bytes: int = 4 * GIB
    max_joint_tokens: int = 2048
    joint_wait_ms: float = 0.0

    def __post_init__(self) -> None:
        counts = (
            "max_seq_len",
            "max_batch",
            "max_sessions_per_client",
            "max_sessions",
            "max_generation_sessions",
            "max_lora_rank",
            "max_lora_targets",
            "max_generation_sessions_per_client",
            "max_stages",
            "max_joint_tokens",
        )
        for name in counts:
            value = getattr(self, name)
            _check(isinstance(value, int) and value >= 1, name, value, "an integer >= 1")
        _check(self.max_message_bytes >= 64 * 1024, "max_message_bytes", self.max_message_bytes, ">= 65536")
        sizes = (
            "max_tensor_bytes",
            "max_cache_bytes",
            "max_inflight_bytes_per_client",
            "max_inflight_bytes",
            "max_pending_bytes_per_client",
            "max_pending_bytes",
            "max_adapter_bytes",
            "max_cache_bytes_per_client",
            "max_staged_bytes",
        )
        for name in sizes:
            low, need = (0, ">= 0 (0 = auto)") if name in AUTO_SHARES else (1, ">= 1")
            _check(getattr(self, name) >= low, name, getattr(self, name), need)
        _check(0.0 <= self.joint_wait_ms <= 1000.0, "joint_wait_ms", self.joint_wait_ms, "in [0, 1000]")
        for name in ("idle_timeout_s", "stream_timeout_s", "pending_timeout_s"):
            _check(getattr(self, name) > 0, name, getattr(self, name), "> 0")

    def sized(self, free_bytes: int) -> ServerLimits:
        """These limits with every memory budget left at 0 (auto) set to its share of ``free_bytes``."""
        _check(free_bytes >= 1, "free_bytes", free_bytes, ">= 1")
        auto = {
            name: max(MIB, int(share * free_bytes)) for name, share in AUTO_SHARES.items() if getattr(self, name) == 0
        }
        return replace(self, **auto)

    @property
    def is_sized(self) -> bool:
        """Whether no memory budget is left at 0 (auto)."""
        return all(getattr(self, name) > 0 for name in AUTO_SHARES)
