from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Dtype(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[Dtype]
    DTYPE_FLOAT32: _ClassVar[Dtype]
    DTYPE_FLOAT16: _ClassVar[Dtype]
    DTYPE_BFLOAT16: _ClassVar[Dtype]
    DTYPE_FLOAT64: _ClassVar[Dtype]
    DTYPE_INT64: _ClassVar[Dtype]
    DTYPE_INT32: _ClassVar[Dtype]
    DTYPE_INT8: _ClassVar[Dtype]
    DTYPE_UINT8: _ClassVar[Dtype]
    DTYPE_BOOL: _ClassVar[Dtype]

class ErrorReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ERROR_REASON_UNSPECIFIED: _ClassVar[ErrorReason]
    ERROR_REASON_API_KEY_MISSING: _ClassVar[ErrorReason]
    ERROR_REASON_API_KEY_INVALID: _ClassVar[ErrorReason]
    ERROR_REASON_API_KEY_REVOKED: _ClassVar[ErrorReason]
    ERROR_REASON_TENANT_MISMATCH: _ClassVar[ErrorReason]
    ERROR_REASON_RATE_LIMITED: _ClassVar[ErrorReason]
    ERROR_REASON_RESOURCE_NOT_FOUND: _ClassVar[ErrorReason]
    ERROR_REASON_INVALID_ARGUMENT: _ClassVar[ErrorReason]
    ERROR_REASON_ALREADY_EXISTS: _ClassVar[ErrorReason]
    ERROR_REASON_FAILED_PRECONDITION: _ClassVar[ErrorReason]
    ERROR_REASON_DP_BUDGET_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_INTEGRITY_ERROR: _ClassVar[ErrorReason]
    ERROR_REASON_TENANT_SHREDDED: _ClassVar[ErrorReason]
    ERROR_REASON_INSECURE_PARAMETERS: _ClassVar[ErrorReason]
    ERROR_REASON_SECRET_KEY_REFUSED: _ClassVar[ErrorReason]
    ERROR_REASON_FUTURE_CANCELLED: _ClassVar[ErrorReason]
    ERROR_REASON_DEPENDENCY_UNAVAILABLE: _ClassVar[ErrorReason]
    ERROR_REASON_NOT_IMPLEMENTED: _ClassVar[ErrorReason]
    ERROR_REASON_INTERNAL: _ClassVar[ErrorReason]
    ERROR_REASON_API_KEY_EXPIRED: _ClassVar[ErrorReason]
    ERROR_REASON_PERMISSION_DENIED: _ClassVar[ErrorReason]
    ERROR_REASON_QUOTA_EXCEEDED: _ClassVar[ErrorReason]
    ERROR_REASON_DP_BATCH_IMPLAUSIBLE: _ClassVar[ErrorReason]
    ERROR_REASON_DEADLINE_TOO_SHORT: _ClassVar[ErrorReason]

class AccountantType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACCOUNTANT_TYPE_UNSPECIFIED: _ClassVar[AccountantType]
    ACCOUNTANT_TYPE_PLD: _ClassVar[AccountantType]
    ACCOUNTANT_TYPE_PRV: _ClassVar[AccountantType]
    ACCOUNTANT_TYPE_RDP: _ClassVar[AccountantType]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_STOP: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
DTYPE_UNSPECIFIED: Dtype
DTYPE_FLOAT32: Dtype
DTYPE_FLOAT16: Dtype
DTYPE_BFLOAT16: Dtype
DTYPE_FLOAT64: Dtype
DTYPE_INT64: Dtype
DTYPE_INT32: Dtype
DTYPE_INT8: Dtype
DTYPE_UINT8: Dtype
DTYPE_BOOL: Dtype
ERROR_REASON_UNSPECIFIED: ErrorReason
ERROR_REASON_API_KEY_MISSING: ErrorReason
ERROR_REASON_API_KEY_INVALID: ErrorReason
ERROR_REASON_API_KEY_REVOKED: ErrorReason
ERROR_REASON_TENANT_MISMATCH: ErrorReason
ERROR_REASON_RATE_LIMITED: ErrorReason
ERROR_REASON_RESOURCE_NOT_FOUND: ErrorReason
ERROR_REASON_INVALID_ARGUMENT: ErrorReason
ERROR_REASON_ALREADY_EXISTS: ErrorReason
ERROR_REASON_FAILED_PRECONDITION: ErrorReason
ERROR_REASON_DP_BUDGET_EXCEEDED: ErrorReason
ERROR_REASON_INTEGRITY_ERROR: ErrorReason
ERROR_REASON_TENANT_SHREDDED: ErrorReason
ERROR_REASON_INSECURE_PARAMETERS: ErrorReason
ERROR_REASON_SECRET_KEY_REFUSED: ErrorReason
ERROR_REASON_FUTURE_CANCELLED: ErrorReason
ERROR_REASON_DEPENDENCY_UNAVAILABLE: ErrorReason
ERROR_REASON_NOT_IMPLEMENTED: ErrorReason
ERROR_REASON_INTERNAL: ErrorReason
ERROR_REASON_API_KEY_EXPIRED: ErrorReason
ERROR_REASON_PERMISSION_DENIED: ErrorReason
ERROR_REASON_QUOTA_EXCEEDED: ErrorReason
ERROR_REASON_DP_BATCH_IMPLAUSIBLE: ErrorReason
ERROR_REASON_DEADLINE_TOO_SHORT: ErrorReason
ACCOUNTANT_TYPE_UNSPECIFIED: AccountantType
ACCOUNTANT_TYPE_PLD: AccountantType
ACCOUNTANT_TYPE_PRV: AccountantType
ACCOUNTANT_TYPE_RDP: AccountantType
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_STOP: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Dtype
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Dtype, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class TokenSequence(_message.Message):
    __slots__ = ("token_ids",)
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class ErrorDetail(_message.Message):
    __slots__ = ("code", "message", "reason", "metadata", "domain")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    metadata: _containers.ScalarMap[str, str]
    domain: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ..., domain: _Optional[str] = ...) -> None: ...

class EncryptionInfo(_message.Message):
    __slots__ = ("algorithm", "format_version", "kek_version", "key_id", "segment_size")
    ALGORITHM_FIELD_NUMBER: _ClassVar[int]
    FORMAT_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEK_VERSION_FIELD_NUMBER: _ClassVar[int]
    KEY_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_SIZE_FIELD_NUMBER: _ClassVar[int]
    algorithm: str
    format_version: int
    kek_version: int
    key_id: str
    segment_size: int
    def __init__(self, algorithm: _Optional[str] = ..., format_version: _Optional[int] = ..., kek_version: _Optional[int] = ..., key_id: _Optional[str] = ..., segment_size: _Optional[int] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_tokens", "temperature", "top_p", "top_k", "stop", "seed", "num_samples", "return_logprobs")
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    RETURN_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    max_tokens: int
    temperature: float
    top_p: float
    top_k: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    seed: int
    num_samples: int
    return_logprobs: bool
    def __init__(self, max_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., seed: _Optional[int] = ..., num_samples: _Optional[int] = ..., return_logprobs: _Optional[bool] = ...) -> None: ...

class Lineage(_message.Message):
    __slots__ = ("attested", "parent_artifact_id", "session_id", "budgets", "non_private_steps", "private_steps", "external_ancestry")
    ATTESTED_FIELD_NUMBER: _ClassVar[int]
    PARENT_ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    NON_PRIVATE_STEPS_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_STEPS_FIELD_NUMBER: _ClassVar[int]
    EXTERNAL_ANCESTRY_FIELD_NUMBER: _ClassVar[int]
    attested: bool
    parent_artifact_id: str
    session_id: str
    budgets: _containers.RepeatedCompositeFieldContainer[LineageBudget]
    non_private_steps: int
    private_steps: int
    external_ancestry: bool
    def __init__(self, attested: _Optional[bool] = ..., parent_artifact_id: _Optional[str] = ..., session_id: _Optional[str] = ..., budgets: _Optional[_Iterable[_Union[LineageBudget, _Mapping]]] = ..., non_private_steps: _Optional[int] = ..., private_steps: _Optional[int] = ..., external_ancestry: _Optional[bool] = ...) -> None: ...

class LineageBudget(_message.Message):
    __slots__ = ("budget_id", "epsilon", "delta")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    epsilon: float
    delta: float
    def __init__(self, budget_id: _Optional[str] = ..., epsilon: _Optional[float] = ..., delta: _Optional[float] = ...) -> None: ...
