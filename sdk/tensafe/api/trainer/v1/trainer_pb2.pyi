import datetime

from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tensafe.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class LoraBias(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LORA_BIAS_UNSPECIFIED: _ClassVar[LoraBias]
    LORA_BIAS_NONE: _ClassVar[LoraBias]
    LORA_BIAS_ALL: _ClassVar[LoraBias]
    LORA_BIAS_LORA_ONLY: _ClassVar[LoraBias]

class DPSampling(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DP_SAMPLING_UNSPECIFIED: _ClassVar[DPSampling]
    DP_SAMPLING_CLIENT: _ClassVar[DPSampling]
    DP_SAMPLING_SERVER: _ClassVar[DPSampling]

class SessionState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SESSION_STATE_UNSPECIFIED: _ClassVar[SessionState]
    SESSION_STATE_ACTIVE: _ClassVar[SessionState]
    SESSION_STATE_CLOSED: _ClassVar[SessionState]

class OpType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    OP_TYPE_UNSPECIFIED: _ClassVar[OpType]
    OP_TYPE_FORWARD_BACKWARD: _ClassVar[OpType]
    OP_TYPE_FORWARD: _ClassVar[OpType]
    OP_TYPE_OPTIM_STEP: _ClassVar[OpType]
    OP_TYPE_SAMPLE: _ClassVar[OpType]
    OP_TYPE_SAVE_STATE: _ClassVar[OpType]
    OP_TYPE_LOAD_STATE: _ClassVar[OpType]
    OP_TYPE_GET_INFO: _ClassVar[OpType]
    OP_TYPE_FORWARD_CUSTOM: _ClassVar[OpType]
    OP_TYPE_BACKWARD_CUSTOM: _ClassVar[OpType]

class FutureState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FUTURE_STATE_UNSPECIFIED: _ClassVar[FutureState]
    FUTURE_STATE_PENDING: _ClassVar[FutureState]
    FUTURE_STATE_RUNNING: _ClassVar[FutureState]
    FUTURE_STATE_SUCCEEDED: _ClassVar[FutureState]
    FUTURE_STATE_FAILED: _ClassVar[FutureState]
    FUTURE_STATE_CANCELLED: _ClassVar[FutureState]
LORA_BIAS_UNSPECIFIED: LoraBias
LORA_BIAS_NONE: LoraBias
LORA_BIAS_ALL: LoraBias
LORA_BIAS_LORA_ONLY: LoraBias
DP_SAMPLING_UNSPECIFIED: DPSampling
DP_SAMPLING_CLIENT: DPSampling
DP_SAMPLING_SERVER: DPSampling
SESSION_STATE_UNSPECIFIED: SessionState
SESSION_STATE_ACTIVE: SessionState
SESSION_STATE_CLOSED: SessionState
OP_TYPE_UNSPECIFIED: OpType
OP_TYPE_FORWARD_BACKWARD: OpType
OP_TYPE_FORWARD: OpType
OP_TYPE_OPTIM_STEP: OpType
OP_TYPE_SAMPLE: OpType
OP_TYPE_SAVE_STATE: OpType
OP_TYPE_LOAD_STATE: OpType
OP_TYPE_GET_INFO: OpType
OP_TYPE_FORWARD_CUSTOM: OpType
OP_TYPE_BACKWARD_CUSTOM: OpType
FUTURE_STATE_UNSPECIFIED: FutureState
FUTURE_STATE_PENDING: FutureState
FUTURE_STATE_RUNNING: FutureState
FUTURE_STATE_SUCCEEDED: FutureState
FUTURE_STATE_FAILED: FutureState
FUTURE_STATE_CANCELLED: FutureState

class LoRAConfig(_message.Message):
    __slots__ = ("rank", "alpha", "dropout", "target_modules", "bias")
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    DROPOUT_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    rank: int
    alpha: float
    dropout: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    bias: LoraBias
    def __init__(self, rank: _Optional[int] = ..., alpha: _Optional[float] = ..., dropout: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ..., bias: _Optional[_Union[LoraBias, str]] = ...) -> None: ...

class OptimizerConfig(_message.Message):
    __slots__ = ("name", "learning_rate", "weight_decay", "betas", "eps", "momentum")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    BETAS_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    name: str
    learning_rate: float
    weight_decay: float
    betas: _containers.RepeatedScalarFieldContainer[float]
    eps: float
    momentum: float
    def __init__(self, name: _Optional[str] = ..., learning_rate: _Optional[float] = ..., weight_decay: _Optional[float] = ..., betas: _Optional[_Iterable[float]] = ..., eps: _Optional[float] = ..., momentum: _Optional[float] = ...) -> None: ...

class LossConfig(_message.Message):
    __slots__ = ("name", "kwargs")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KWARGS_FIELD_NUMBER: _ClassVar[int]
    name: str
    kwargs: _struct_pb2.Struct
    def __init__(self, name: _Optional[str] = ..., kwargs: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class DPConfig(_message.Message):
    __slots__ = ("enabled", "noise_multiplier", "max_grad_norm", "target_epsilon", "target_delta", "accountant_type", "dataset_size", "sample_rate", "max_steps", "budget_id", "sampling", "dataset_artifact_id")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    TARGET_DELTA_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_TYPE_FIELD_NUMBER: _ClassVar[int]
    DATASET_SIZE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    MAX_STEPS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    DATASET_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    noise_multiplier: float
    max_grad_norm: float
    target_epsilon: float
    target_delta: float
    accountant_type: _common_pb2.AccountantType
    dataset_size: int
    sample_rate: float
    max_steps: int
    budget_id: str
    sampling: DPSampling
    dataset_artifact_id: str
    def __init__(self, enabled: _Optional[bool] = ..., noise_multiplier: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., target_epsilon: _Optional[float] = ..., target_delta: _Optional[float] = ..., accountant_type: _Optional[_Union[_common_pb2.AccountantType, str]] = ..., dataset_size: _Optional[int] = ..., sample_rate: _Optional[float] = ..., max_steps: _Optional[int] = ..., budget_id: _Optional[str] = ..., sampling: _Optional[_Union[DPSampling, str]] = ..., dataset_artifact_id: _Optional[str] = ...) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("model_ref", "lora_config", "optimizer", "batch_size", "gradient_accumulation_steps", "seed", "max_sequence_length", "dp_config", "loss", "metadata")
    MODEL_REF_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    GRADIENT_ACCUMULATION_STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    DP_CONFIG_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    model_ref: str
    lora_config: LoRAConfig
    optimizer: OptimizerConfig
    batch_size: int
    gradient_accumulation_steps: int
    seed: int
    max_sequence_length: int
    dp_config: DPConfig
    loss: LossConfig
    metadata: _struct_pb2.Struct
    def __init__(self, model_ref: _Optional[str] = ..., lora_config: _Optional[_Union[LoRAConfig, _Mapping]] = ..., optimizer: _Optional[_Union[OptimizerConfig, _Mapping]] = ..., batch_size: _Optional[int] = ..., gradient_accumulation_steps: _Optional[int] = ..., seed: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., dp_config: _Optional[_Union[DPConfig, _Mapping]] = ..., loss: _Optional[_Union[LossConfig, _Mapping]] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...

class Session(_message.Message):
    __slots__ = ("session_id", "tenant_id", "config", "state", "step", "last_sequence", "budget_id", "create_time", "close_time")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LAST_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    CLOSE_TIME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    tenant_id: str
    config: TrainingConfig
    state: SessionState
    step: int
    last_sequence: int
    budget_id: str
    create_time: _timestamp_pb2.Timestamp
    close_time: _timestamp_pb2.Timestamp
    def __init__(self, session_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., config: _Optional[_Union[TrainingConfig, _Mapping]] = ..., state: _Optional[_Union[SessionState, str]] = ..., step: _Optional[int] = ..., last_sequence: _Optional[int] = ..., budget_id: _Optional[str] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., close_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class SessionInfo(_message.Message):
    __slots__ = ("session_id", "model_ref", "step", "lora_config", "num_trainable_parameters", "num_parameters", "vocab_size", "max_sequence_length", "eos_token_id", "pad_token_id", "dp_enabled", "budget_id", "total_epsilon", "pending_ops", "tokens_processed", "metadata", "lineage", "spent_without_update")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REF_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    LORA_CONFIG_FIELD_NUMBER: _ClassVar[int]
    NUM_TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    EOS_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    PAD_TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    DP_ENABLED_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPSILON_FIELD_NUMBER: _ClassVar[int]
    PENDING_OPS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    SPENT_WITHOUT_UPDATE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    model_ref: str
    step: int
    lora_config: LoRAConfig
    num_trainable_parameters: int
    num_parameters: int
    vocab_size: int
    max_sequence_length: int
    eos_token_id: int
    pad_token_id: int
    dp_enabled: bool
    budget_id: str
    total_epsilon: float
    pending_ops: int
    tokens_processed: int
    metadata: _struct_pb2.Struct
    lineage: _common_pb2.Lineage
    spent_without_update: int
    def __init__(self, session_id: _Optional[str] = ..., model_ref: _Optional[str] = ..., step: _Optional[int] = ..., lora_config: _Optional[_Union[LoRAConfig, _Mapping]] = ..., num_trainable_parameters: _Optional[int] = ..., num_parameters: _Optional[int] = ..., vocab_size: _Optional[int] = ..., max_sequence_length: _Optional[int] = ..., eos_token_id: _Optional[int] = ..., pad_token_id: _Optional[int] = ..., dp_enabled: _Optional[bool] = ..., budget_id: _Optional[str] = ..., total_epsilon: _Optional[float] = ..., pending_ops: _Optional[int] = ..., tokens_processed: _Optional[int] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., lineage: _Optional[_Union[_common_pb2.Lineage, _Mapping]] = ..., spent_without_update: _Optional[int] = ...) -> None: ...

class FutureRef(_message.Message):
    __slots__ = ("session_id", "future_id", "sequence", "op")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FUTURE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    future_id: str
    sequence: int
    op: OpType
    def __init__(self, session_id: _Optional[str] = ..., future_id: _Optional[str] = ..., sequence: _Optional[int] = ..., op: _Optional[_Union[OpType, str]] = ...) -> None: ...

class FutureEvent(_message.Message):
    __slots__ = ("session_id", "future_id", "sequence", "op", "state", "forward_backward", "forward", "optim_step", "sample", "save_state", "load_state", "info", "forward_custom", "backward_custom", "error", "submit_time", "start_time", "end_time")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FUTURE_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    FORWARD_BACKWARD_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FIELD_NUMBER: _ClassVar[int]
    OPTIM_STEP_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_FIELD_NUMBER: _ClassVar[int]
    SAVE_STATE_FIELD_NUMBER: _ClassVar[int]
    LOAD_STATE_FIELD_NUMBER: _ClassVar[int]
    INFO_FIELD_NUMBER: _ClassVar[int]
    FORWARD_CUSTOM_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_CUSTOM_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    SUBMIT_TIME_FIELD_NUMBER: _ClassVar[int]
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    future_id: str
    sequence: int
    op: OpType
    state: FutureState
    forward_backward: ForwardBackwardResult
    forward: ForwardResult
    optim_step: OptimStepResult
    sample: SampleResult
    save_state: SaveStateResult
    load_state: LoadStateResult
    info: SessionInfo
    forward_custom: ForwardCustomResult
    backward_custom: BackwardCustomResult
    error: _common_pb2.ErrorDetail
    submit_time: _timestamp_pb2.Timestamp
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    def __init__(self, session_id: _Optional[str] = ..., future_id: _Optional[str] = ..., sequence: _Optional[int] = ..., op: _Optional[_Union[OpType, str]] = ..., state: _Optional[_Union[FutureState, str]] = ..., forward_backward: _Optional[_Union[ForwardBackwardResult, _Mapping]] = ..., forward: _Optional[_Union[ForwardResult, _Mapping]] = ..., optim_step: _Optional[_Union[OptimStepResult, _Mapping]] = ..., sample: _Optional[_Union[SampleResult, _Mapping]] = ..., save_state: _Optional[_Union[SaveStateResult, _Mapping]] = ..., load_state: _Optional[_Union[LoadStateResult, _Mapping]] = ..., info: _Optional[_Union[SessionInfo, _Mapping]] = ..., forward_custom: _Optional[_Union[ForwardCustomResult, _Mapping]] = ..., backward_custom: _Optional[_Union[BackwardCustomResult, _Mapping]] = ..., error: _Optional[_Union[_common_pb2.ErrorDetail, _Mapping]] = ..., submit_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Batch(_message.Message):
    __slots__ = ("input_ids", "attention_mask", "labels", "advantages", "old_logprobs", "extra")
    class ExtraEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: _common_pb2.Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ...) -> None: ...
    INPUT_IDS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_MASK_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ADVANTAGES_FIELD_NUMBER: _ClassVar[int]
    OLD_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    input_ids: _common_pb2.Tensor
    attention_mask: _common_pb2.Tensor
    labels: _common_pb2.Tensor
    advantages: _common_pb2.Tensor
    old_logprobs: _common_pb2.Tensor
    extra: _containers.MessageMap[str, _common_pb2.Tensor]
    def __init__(self, input_ids: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., attention_mask: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., labels: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., advantages: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., old_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., extra: _Optional[_Mapping[str, _common_pb2.Tensor]] = ...) -> None: ...

class ForwardBackwardResult(_message.Message):
    __slots__ = ("loss", "metrics", "num_tokens", "logprobs", "num_sequences")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    metrics: _containers.ScalarMap[str, float]
    num_tokens: int
    logprobs: _common_pb2.Tensor
    num_sequences: int
    def __init__(self, loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., num_tokens: _Optional[int] = ..., logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_sequences: _Optional[int] = ...) -> None: ...

class ForwardResult(_message.Message):
    __slots__ = ("loss", "metrics", "num_tokens", "logprobs", "num_sequences")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    LOSS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    loss: float
    metrics: _containers.ScalarMap[str, float]
    num_tokens: int
    logprobs: _common_pb2.Tensor
    num_sequences: int
    def __init__(self, loss: _Optional[float] = ..., metrics: _Optional[_Mapping[str, float]] = ..., num_tokens: _Optional[int] = ..., logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_sequences: _Optional[int] = ...) -> None: ...

class ForwardCustomResult(_message.Message):
    __slots__ = ("logprobs", "num_tokens")
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    logprobs: _common_pb2.Tensor
    num_tokens: int
    def __init__(self, logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class BackwardCustomResult(_message.Message):
    __slots__ = ("num_tokens", "loss")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    loss: float
    def __init__(self, num_tokens: _Optional[int] = ..., loss: _Optional[float] = ...) -> None: ...

class DPMetrics(_message.Message):
    __slots__ = ("noise_applied", "noise_multiplier", "max_grad_norm", "step_epsilon", "total_epsilon", "delta", "target_epsilon", "remaining_epsilon", "sample_rate", "accounted_steps", "accountant_type", "budget_id", "spent_without_update")
    NOISE_APPLIED_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    MAX_GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    STEP_EPSILON_FIELD_NUMBER: _ClassVar[int]
    TOTAL_EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    REMAINING_EPSILON_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTED_STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_TYPE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    SPENT_WITHOUT_UPDATE_FIELD_NUMBER: _ClassVar[int]
    noise_applied: bool
    noise_multiplier: float
    max_grad_norm: float
    step_epsilon: float
    total_epsilon: float
    delta: float
    target_epsilon: float
    remaining_epsilon: float
    sample_rate: float
    accounted_steps: int
    accountant_type: _common_pb2.AccountantType
    budget_id: str
    spent_without_update: int
    def __init__(self, noise_applied: _Optional[bool] = ..., noise_multiplier: _Optional[float] = ..., max_grad_norm: _Optional[float] = ..., step_epsilon: _Optional[float] = ..., total_epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., target_epsilon: _Optional[float] = ..., remaining_epsilon: _Optional[float] = ..., sample_rate: _Optional[float] = ..., accounted_steps: _Optional[int] = ..., accountant_type: _Optional[_Union[_common_pb2.AccountantType, str]] = ..., budget_id: _Optional[str] = ..., spent_without_update: _Optional[int] = ...) -> None: ...

class OptimStepResult(_message.Message):
    __slots__ = ("step", "learning_rate", "grad_norm", "num_tokens", "dp_metrics", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STEP_FIELD_NUMBER: _ClassVar[int]
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    GRAD_NORM_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DP_METRICS_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    step: int
    learning_rate: float
    grad_norm: float
    num_tokens: int
    dp_metrics: DPMetrics
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, step: _Optional[int] = ..., learning_rate: _Optional[float] = ..., grad_norm: _Optional[float] = ..., num_tokens: _Optional[int] = ..., dp_metrics: _Optional[_Union[DPMetrics, _Mapping]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SampledSequence(_message.Message):
    __slots__ = ("prompt_index", "sample_index", "prompt", "completion", "token_ids", "logprobs", "finish_reason")
    PROMPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_INDEX_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    prompt_index: int
    sample_index: int
    prompt: str
    completion: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    logprobs: _containers.RepeatedScalarFieldContainer[float]
    finish_reason: _common_pb2.FinishReason
    def __init__(self, prompt_index: _Optional[int] = ..., sample_index: _Optional[int] = ..., prompt: _Optional[str] = ..., completion: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., logprobs: _Optional[_Iterable[float]] = ..., finish_reason: _Optional[_Union[_common_pb2.FinishReason, str]] = ...) -> None: ...

class SampleResult(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[SampledSequence]
    def __init__(self, samples: _Optional[_Iterable[_Union[SampledSequence, _Mapping]]] = ...) -> None: ...

class SaveStateResult(_message.Message):
    __slots__ = ("artifact_id", "step", "encryption", "size_bytes", "sha256", "name", "metadata", "create_time", "lineage")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    ENCRYPTION_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    step: int
    encryption: _common_pb2.EncryptionInfo
    size_bytes: int
    sha256: bytes
    name: str
    metadata: _struct_pb2.Struct
    create_time: _timestamp_pb2.Timestamp
    lineage: _common_pb2.Lineage
    def __init__(self, artifact_id: _Optional[str] = ..., step: _Optional[int] = ..., encryption: _Optional[_Union[_common_pb2.EncryptionInfo, _Mapping]] = ..., size_bytes: _Optional[int] = ..., sha256: _Optional[bytes] = ..., name: _Optional[str] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., lineage: _Optional[_Union[_common_pb2.Lineage, _Mapping]] = ...) -> None: ...

class LoadStateResult(_message.Message):
    __slots__ = ("step", "artifact_id", "optimizer_restored", "metadata", "lineage")
    STEP_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_RESTORED_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    LINEAGE_FIELD_NUMBER: _ClassVar[int]
    step: int
    artifact_id: str
    optimizer_restored: bool
    metadata: _struct_pb2.Struct
    lineage: _common_pb2.Lineage
    def __init__(self, step: _Optional[int] = ..., artifact_id: _Optional[str] = ..., optimizer_restored: _Optional[bool] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., lineage: _Optional[_Union[_common_pb2.Lineage, _Mapping]] = ...) -> None: ...

class CreateSessionRequest(_message.Message):
    __slots__ = ("config",)
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    config: TrainingConfig
    def __init__(self, config: _Optional[_Union[TrainingConfig, _Mapping]] = ...) -> None: ...

class CreateSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class GetSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ListSessionsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "include_closed")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_CLOSED_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    include_closed: bool
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., include_closed: _Optional[bool] = ...) -> None: ...

class ListSessionsResponse(_message.Message):
    __slots__ = ("sessions", "next_page_token")
    SESSIONS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    sessions: _containers.RepeatedCompositeFieldContainer[Session]
    next_page_token: str
    def __init__(self, sessions: _Optional[_Iterable[_Union[Session, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class CloseSessionRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class CloseSessionResponse(_message.Message):
    __slots__ = ("session",)
    SESSION_FIELD_NUMBER: _ClassVar[int]
    session: Session
    def __init__(self, session: _Optional[_Union[Session, _Mapping]] = ...) -> None: ...

class ForwardBackwardRequest(_message.Message):
    __slots__ = ("session_id", "batch", "loss", "return_logprobs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    batch: Batch
    loss: LossConfig
    return_logprobs: bool
    def __init__(self, session_id: _Optional[str] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., loss: _Optional[_Union[LossConfig, _Mapping]] = ..., return_logprobs: _Optional[bool] = ...) -> None: ...

class ForwardBackwardResponse(_message.Message):
    __slots__ = ("future",)
    FUTURE_FIELD_NUMBER: _ClassVar[int]
    future: FutureRef
    def __init__(self, future: _Optional[_Union[FutureRef, _Mapping]] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("session_id", "batch", "loss", "return_logprobs")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    batch: Batch
    loss: LossConfig
    return_logprobs: bool
    def __init__(self, session_id: _Optional[str] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ..., loss: _Optional[_Union[LossConfig, _Mapping]] = ..., return_logprobs: _Optional[bool] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("future",)
    FUTURE_FIELD_NUMBER: _ClassVar[int]
    future: FutureRef
    def __init__(self, future: _Optional[_Union[FutureRef, _Mapping]] = ...) -> None: ...

class OptimStepRequest(_message.Message):
    __slots__ = ("session_id", "apply_dp_noise", "params")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    APPLY_DP_NOISE_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    apply_dp_noise: bool
    params: OptimizerParams
    def __init__(self, session_id: _Optional[str] = ..., apply_dp_noise: _Optional[bool] = ..., params: _Optional[_Union[OptimizerParams, _Mapping]] = ...) -> None: ...

class OptimizerParams(_message.Message):
    __slots__ = ("learning_rate", "beta1", "beta2", "eps", "weight_decay", "grad_clip_norm")
    LEARNING_RATE_FIELD_NUMBER: _ClassVar[int]
    BETA1_FIELD_NUMBER: _ClassVar[int]
    BETA2_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_DECAY_FIELD_NUMBER: _ClassVar[int]
    GRAD_CLIP_NORM_FIELD_NUMBER: _ClassVar[int]
    learning_rate: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    grad_clip_norm: float
    def __init__(self, learning_rate: _Optional[float] = ..., beta1: _Optional[float] = ..., beta2: _Optional[float] = ..., eps: _Optional[float] = ..., weight_decay: _Optional[float] = ..., grad_clip_norm: _Optional[float] = ...) -> None: ...

class OptimStepResponse(_message.Message):
    __slots__ = ("future",)
    FUTURE_FIELD_NUMBER: _ClassVar[int]
    future: FutureRef
    def __init__(self, future: _Optional[_Union[FutureRef, _Mapping]] = ...) -> None: ...

class SampleRequest(_message.Message):
    __slots__ = ("session_id", "prompts", "prompt_token_ids", "sampling")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    prompt_token_ids: _containers.RepeatedCompositeFieldContainer[_common_pb2.TokenSequence]
    sampling: _common_pb2.SamplingParams
    def __init__(self, session_id: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., prompt_token_ids: _Optional[_Iterable[_Union[_common_pb2.TokenSequence, _Mapping]]] = ..., sampling: _Optional[_Union[_common_pb2.SamplingParams, _Mapping]] = ...) -> None: ...

class SampleResponse(_message.Message):
    __slots__ = ("future",)
    FUTURE_FIELD_NUMBER: _ClassVar[int]
    future: FutureRef
    def __init__(self, future: _Optional[_Union[FutureRef, _Mapping]] = ...) -> None: ...

class SaveStateRequest(_message.Message):
    __slots__ = ("session_id", "include_optimizer", "metadata", "name")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    include_optimizer: bool
    metadata: _struct_pb2.Struct
    name: str
    def __init__(self, session_id: _Optional[str] = ..., include_optimizer: _Optional[bool] = ..., metadata: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., name: _Optional[str] = ...) -> None: ...

class SaveStateResponse(_message.Message):
    __slots__ = ("future",)
    FUTURE_FIELD_NUMBER: _ClassVar[int]
    future: FutureRef
    def __init__(self, future: _Optional[_Union[FutureRef, _Mapping]] = ...) -> None: ...

class LoadStateRequest(_message.Message):
    __slots__ = ("session_id", "artifact_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    artifact_id: str
    def __init__(self, session_id: _Optional[str] = ..., artifact_id: _Optional[str] = ...) -> None: ...

class LoadStateResponse(_message.Message):
    __slots__ = ("future",)
    FUTURE_FIELD_NUMBER: _ClassVar[int]
    future: FutureRef
    def __init__(self, future: _Optional[_Union[FutureRef, _Mapping]] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ("session_id",)
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    def __init__(self, session_id: _Optional[str] = ...) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("future",)
    FUTURE_FIELD_NUMBER: _ClassVar[int]
    future: FutureRef
    def __init__(self, future: _Optional[_Union[FutureRef, _Mapping]] = ...) -> None: ...

class ForwardCustomRequest(_message.Message):
    __slots__ = ("session_id", "batch")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    batch: Batch
    def __init__(self, session_id: _Optional[str] = ..., batch: _Optional[_Union[Batch, _Mapping]] = ...) -> None: ...

class ForwardCustomResponse(_message.Message):
    __slots__ = ("future",)
    FUTURE_FIELD_NUMBER: _ClassVar[int]
    future: FutureRef
    def __init__(self, future: _Optional[_Union[FutureRef, _Mapping]] = ...) -> None: ...

class BackwardCustomRequest(_message.Message):
    __slots__ = ("session_id", "forward_future_id", "grad_logprobs", "loss")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FORWARD_FUTURE_ID_FIELD_NUMBER: _ClassVar[int]
    GRAD_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    LOSS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    forward_future_id: str
    grad_logprobs: _common_pb2.Tensor
    loss: float
    def __init__(self, session_id: _Optional[str] = ..., forward_future_id: _Optional[str] = ..., grad_logprobs: _Optional[_Union[_common_pb2.Tensor, _Mapping]] = ..., loss: _Optional[float] = ...) -> None: ...

class BackwardCustomResponse(_message.Message):
    __slots__ = ("future",)
    FUTURE_FIELD_NUMBER: _ClassVar[int]
    future: FutureRef
    def __init__(self, future: _Optional[_Union[FutureRef, _Mapping]] = ...) -> None: ...

class WatchFuturesRequest(_message.Message):
    __slots__ = ("session_id", "future_ids", "after_sequence")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FUTURE_IDS_FIELD_NUMBER: _ClassVar[int]
    AFTER_SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    future_ids: _containers.RepeatedScalarFieldContainer[str]
    after_sequence: int
    def __init__(self, session_id: _Optional[str] = ..., future_ids: _Optional[_Iterable[str]] = ..., after_sequence: _Optional[int] = ...) -> None: ...

class WatchFuturesResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: FutureEvent
    def __init__(self, event: _Optional[_Union[FutureEvent, _Mapping]] = ...) -> None: ...

class GetFutureRequest(_message.Message):
    __slots__ = ("session_id", "future_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FUTURE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    future_id: str
    def __init__(self, session_id: _Optional[str] = ..., future_id: _Optional[str] = ...) -> None: ...

class GetFutureResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: FutureEvent
    def __init__(self, event: _Optional[_Union[FutureEvent, _Mapping]] = ...) -> None: ...

class CancelFutureRequest(_message.Message):
    __slots__ = ("session_id", "future_id")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    FUTURE_ID_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    future_id: str
    def __init__(self, session_id: _Optional[str] = ..., future_id: _Optional[str] = ...) -> None: ...

class CancelFutureResponse(_message.Message):
    __slots__ = ("cancelled", "event")
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    cancelled: bool
    event: FutureEvent
    def __init__(self, cancelled: _Optional[bool] = ..., event: _Optional[_Union[FutureEvent, _Mapping]] = ...) -> None: ...
