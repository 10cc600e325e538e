from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
BFLOAT16: DType
FLOAT16: DType

class TensorChunk(_message.Message):
    __slots__ = ("dtype", "shape", "offset", "data", "total_bytes", "compression", "scales")
    class Compression(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NONE: _ClassVar[TensorChunk.Compression]
        INT8_ROWS: _ClassVar[TensorChunk.Compression]
        FP8_E4M3_ROWS: _ClassVar[TensorChunk.Compression]
    NONE: TensorChunk.Compression
    INT8_ROWS: TensorChunk.Compression
    FP8_E4M3_ROWS: TensorChunk.Compression
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SCALES_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    data: bytes
    total_bytes: int
    compression: TensorChunk.Compression
    scales: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., total_bytes: _Optional[int] = ..., compression: _Optional[_Union[TensorChunk.Compression, str]] = ..., scales: _Optional[bytes] = ...) -> None: ...

class LoraConfig(_message.Message):
    __slots__ = ("r", "alpha", "dropout", "target_modules")
    R_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    r: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, r: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("lr", "weight_decay", "beta1", "beta2", "eps", "max_grad_norm", "proximal_mu")
    LR_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    PROXIMAL_MU_FIELD_NUMBER: _ClassVar[int]
    lr: float
    weight_decay: float
    beta1: float
    beta2: float
    eps: float
    max_grad_norm: float
    proximal_mu: float
    def __init__(self, lr: _Optional[float] = ..., weight_decay: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., proximal_mu: _Optional[float] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_seq_len", "max_batch", "max_message_bytes", "max_sessions_per_client", "idle_timeout_s")
    MAX_SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_SESSIONS_PER_CLIENT_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    max_seq_len: int
    max_batch: int
    max_message_bytes: int
    max_sessions_per_client: int
    idle_timeout_s: float
    def __init__(self, max_seq_len: _Optional[int] = ..., max_batch: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_sessions_per_client: _Optional[int] = ..., idle_timeout_s: _Optional[float] = ...) -> None: ...

class OpenSessionRequest(_message.Message):
    __slots__ = ("base_fingerprint", "head_layers", "tail_layers", "trunk_lora", "optimizer", "wire_dtype", "seed", "wire_compression")
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HEAD_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TAIL_LAYERS_FIELD_NUMBER: _ClassVar[int]
    TRUNK_LORA_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WIRE_COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    base_fingerprint: str
    head_layers: int
    tail_layers: int
    trunk_lora: LoraConfig
    optimizer: OptimizerConfig
    wire_dtype: DType
    seed: int
    wire_compression: TensorChunk.Compression
    def __init__(self, base_fingerprint: _Optional[str] = ..., head_layers: _Optional[int] = ..., tail_layers: _Optional[int] = ..., trunk_lora: _Optional[_Union[LoraConfig, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., wire_dtype: _Optional[_Union[DType, str]] = ..., seed: _Optional[int] = ..., wire_compression: _Optional[_Union[TensorChunk.Compression, str]] = ...) -> None: ...

class OpenSessionResponse(_message.Message):
    __slots__ = ("session_id", "num_layers", "hidden_size", "trunk_start", "trunk_end", "limits", "server_version")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    TRUNK_START_FIELD_NUMBER: _ClassVar[int]
    TRUNK_END_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    num_layers: int
    hidden_size: int
    trunk_start: int
    trunk_end: int
    limits: Limits
    server_version: str
    def __init__(self, session_id: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., trunk_start: _Optional[int] = ..., trunk_end: _Optional[int] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., server_version: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "step", "lengths", "hidden", "micro_batch", "micro_batches")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    lengths: _containers.RepeatedScalarFieldContainer[int]
    hidden: TensorChunk
    micro_batch: int
    micro_batches: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., lengths: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[TensorChunk, _Mapping]] = ..., micro_batch: _Optional[int] = ..., micro_batches: _Optional[int] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("step", "hidden", "compute_s", "micro_batch")
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    step: int
    hidden: TensorChunk
    compute_s: float
    micro_batch: int
    def __init__(self, step: _Optional[int] = ..., hidden: _Optional[_Union[TensorChunk, _Mapping]] = ..., compute_s: _Optional[float] = ..., micro_batch: _Optional[int] = ...) -> None: ...

class BackwardRequest(_message.Message):
    __slots__ = ("session_id", "step", "update", "grad", "micro_batch", "micro_batches")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCHES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    step: int
    update: bool
    grad: TensorChunk
    micro_batch: int
    micro_batches: int
    def __init__(self, session_id: _Optional[str] = ..., step: _Optional[int] = ..., update: bool = ..., grad: _Optional[_Union[TensorChunk, _Mapping]] = ..., micro_batch: _Optional[int] = ..., micro_batches: _Optional[int] = ...) -> None: ...

class BackwardResponse(_message.Message):
    __slots__ = ("step", "grad", "compute_s", "micro_batch")
    STEP_FIELD_NUMBER: _ClassVar[int]
    GRAD_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    MICRO_BATCH_FIELD_NUMBER: _ClassVar[int]
    step: int
    grad: TensorChunk
    compute_s: float
    micro_batch: int
    def __init__(self, step: _Optional[int] = ..., grad: _Optional[_Union[TensorChunk, _Mapping]] = ..., compute_s: _Optional[float] = ..., micro_batch: _Optional[int] = ...) -> None: ...

class NamedTensorChunk(_message.Message):
    __slots__ = ("session_id", "name", "tensor", "group")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    GROUP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    name: str
    tensor: TensorChunk
    group: StageGroup
    def __init__(self, session_id: _Optional[str] = ..., name: _Optional[str] = ..., tensor: _Optional[_Union[TensorChunk, _Mapping]] = ..., group: _Optional[_Union[StageGroup, _Mapping]] = ...) -> None: ...

class StageGroup(_message.Message):
    __slots__ = ("members", "step_timeout_s")
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    STEP_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    members: _containers.RepeatedScalarFieldContainer[str]
    step_timeout_s: float
    def __init__(self, members: _Optional[_Iterable[str]] = ..., step_timeout_s: _Optional[float] = ...) -> None: ...

class AdapterRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class PutAdapterResponse(_message.Message):
    __slots__ = ("tensors",)
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    tensors: int
    def __init__(self, tensors: _Optional[int] = ...) -> None: ...

class GenerateOpen(_message.Message):
    __slots__ = ("session_id", "max_length", "naive")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MAX_LENGTH_FIELD_NUMBER: _ClassVar[int]
    NAIVE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    max_length: int
    naive: bool
    def __init__(self, session_id: _Optional[str] = ..., max_length: _Optional[int] = ..., naive: bool = ...) -> None: ...

class GenerateStep(_message.Message):
    __slots__ = ("step", "lengths", "keep_rows", "hidden")
    STEP_FIELD_NUMBER: _ClassVar[int]
    LENGTHS_FIELD_NUMBER: _ClassVar[int]
    KEEP_ROWS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    step: int
    lengths: _containers.RepeatedScalarFieldContainer[int]
    keep_rows: _containers.RepeatedScalarFieldContainer[int]
    hidden: TensorChunk
    def __init__(self, step: _Optional[int] = ..., lengths: _Optional[_Iterable[int]] = ..., keep_rows: _Optional[_Iterable[int]] = ..., hidden: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class GenerateClose(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GenerateRewind(_message.Message):
    __slots__ = ("length",)
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    length: int
    def __init__(self, length: _Optional[int] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("open", "step", "close", "rewind")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    REWIND_FIELD_NUMBER: _ClassVar[int]
    open: GenerateOpen
    step: GenerateStep
    close: GenerateClose
    rewind: GenerateRewind
    def __init__(self, open: _Optional[_Union[GenerateOpen, _Mapping]] = ..., step: _Optional[_Union[GenerateStep, _Mapping]] = ..., close: _Optional[_Union[GenerateClose, _Mapping]] = ..., rewind: _Optional[_Union[GenerateRewind, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("step", "hidden")
    STEP_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_FIELD_NUMBER: _ClassVar[int]
    step: int
    hidden: TensorChunk
    def __init__(self, step: _Optional[int] = ..., hidden: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("session_id", "num_samples")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    num_samples: int
    def __init__(self, session_id: _Optional[str] = ..., num_samples: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("client_id", "rounds", "local_steps", "mode", "next_round", "seed")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    NEXT_ROUND_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    rounds: int
    local_steps: int
    mode: str
    next_round: int
    seed: int
    def __init__(self, client_id: _Optional[str] = ..., rounds: _Optional[int] = ..., local_steps: _Optional[int] = ..., mode: _Optional[str] = ..., next_round: _Optional[int] = ..., seed: _Optional[int] = ...) -> None: ...

class RoundRequest(_message.Message):
    __slots__ = ("after_round",)
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    after_round: int
    def __init__(self, after_round: _Optional[int] = ...) -> None: ...

class RoundMessage(_message.Message):
    __slots__ = ("round", "selected", "finished", "local_steps", "tensor")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SELECTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    round: int
    selected: bool
    finished: bool
    local_steps: int
    tensor: NamedTensorChunk
    def __init__(self, round: _Optional[int] = ..., selected: bool = ..., finished: bool = ..., local_steps: _Optional[int] = ..., tensor: _Optional[_Union[NamedTensorChunk, _Mapping]] = ...) -> None: ...

class SubmitChunk(_message.Message):
    __slots__ = ("round", "num_samples", "loss", "tensor")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    round: int
    num_samples: int
    loss: float
    tensor: NamedTensorChunk
    def __init__(self, round: _Optional[int] = ..., num_samples: _Optional[int] = ..., loss: _Optional[float] = ..., tensor: _Optional[_Union[NamedTensorChunk, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("accepted",)
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    def __init__(self, accepted: bool = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RpcStats(_message.Message):
    __slots__ = ("rpc", "calls", "bytes_received", "bytes_sent", "compute_s")
    RPC_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_S_FIELD_NUMBER: _ClassVar[int]
    rpc: str
    calls: int
    bytes_received: int
    bytes_sent: int
    compute_s: float
    def __init__(self, rpc: _Optional[str] = ..., calls: _Optional[int] = ..., bytes_received: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., compute_s: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("rpcs", "open_sessions", "generation_sessions", "cache_bytes", "server_cache_bytes", "server_reserved_bytes")
    RPCS_FIELD_NUMBER: _ClassVar[int]
    OPEN_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SERVER_RESERVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    rpcs: _containers.RepeatedCompositeFieldContainer[RpcStats]
    open_sessions: int
    generation_sessions: int
    cache_bytes: int
    server_cache_bytes: int
    server_reserved_bytes: int
    def __init__(self, rpcs: _Optional[_Iterable[_Union[RpcStats, _Mapping]]] = ..., open_sessions: _Optional[int] = ..., generation_sessions: _Optional[int] = ..., cache_bytes: _Optional[int] = ..., server_cache_bytes: _Optional[int] = ..., server_reserved_bytes: _Optional[int] = ...) -> None: ...

class StagedRequest(_message.Message):
    __slots__ = ("session_id", "key")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    key: str
    def __init__(self, session_id: _Optional[str] = ..., key: _Optional[str] = ...) -> None: ...

class CollectRequest(_message.Message):
    __slots__ = ("key", "client_ids", "drop")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CLIENT_IDS_FIELD_NUMBER: _ClassVar[int]
    DROP_FIELD_NUMBER: _ClassVar[int]
    key: str
    client_ids: _containers.RepeatedScalarFieldContainer[str]
    drop: bool
    def __init__(self, key: _Optional[str] = ..., client_ids: _Optional[_Iterable[str]] = ..., drop: bool = ...) -> None: ...
