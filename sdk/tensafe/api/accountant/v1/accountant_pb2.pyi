import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from tensafe.api.common.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BudgetState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BUDGET_STATE_UNSPECIFIED: _ClassVar[BudgetState]
    BUDGET_STATE_ACTIVE: _ClassVar[BudgetState]
    BUDGET_STATE_EXHAUSTED: _ClassVar[BudgetState]
    BUDGET_STATE_CLOSED: _ClassVar[BudgetState]
BUDGET_STATE_UNSPECIFIED: BudgetState
BUDGET_STATE_ACTIVE: BudgetState
BUDGET_STATE_EXHAUSTED: BudgetState
BUDGET_STATE_CLOSED: BudgetState

class Budget(_message.Message):
    __slots__ = ("budget_id", "tenant_id", "session_id", "target_epsilon", "target_delta", "accountant_type", "sample_rate", "spent_epsilon", "remaining_epsilon", "num_steps", "state", "create_time", "update_time")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    TENANT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    TARGET_DELTA_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    SPENT_EPSILON_FIELD_NUMBER: _ClassVar[int]
    REMAINING_EPSILON_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATE_TIME_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    tenant_id: str
    session_id: str
    target_epsilon: float
    target_delta: float
    accountant_type: _common_pb2.AccountantType
    sample_rate: float
    spent_epsilon: float
    remaining_epsilon: float
    num_steps: int
    state: BudgetState
    create_time: _timestamp_pb2.Timestamp
    update_time: _timestamp_pb2.Timestamp
    def __init__(self, budget_id: _Optional[str] = ..., tenant_id: _Optional[str] = ..., session_id: _Optional[str] = ..., target_epsilon: _Optional[float] = ..., target_delta: _Optional[float] = ..., accountant_type: _Optional[_Union[_common_pb2.AccountantType, str]] = ..., sample_rate: _Optional[float] = ..., spent_epsilon: _Optional[float] = ..., remaining_epsilon: _Optional[float] = ..., num_steps: _Optional[int] = ..., state: _Optional[_Union[BudgetState, str]] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., update_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class StepRecord(_message.Message):
    __slots__ = ("budget_id", "step_id", "noise_multiplier", "sample_rate", "num_steps", "epsilon_after", "record_time")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    EPSILON_AFTER_FIELD_NUMBER: _ClassVar[int]
    RECORD_TIME_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    step_id: str
    noise_multiplier: float
    sample_rate: float
    num_steps: int
    epsilon_after: float
    record_time: _timestamp_pb2.Timestamp
    def __init__(self, budget_id: _Optional[str] = ..., step_id: _Optional[str] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., num_steps: _Optional[int] = ..., epsilon_after: _Optional[float] = ..., record_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class CreateBudgetRequest(_message.Message):
    __slots__ = ("session_id", "target_epsilon", "target_delta", "accountant_type", "sample_rate")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    TARGET_DELTA_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_TYPE_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    target_epsilon: float
    target_delta: float
    accountant_type: _common_pb2.AccountantType
    sample_rate: float
    def __init__(self, session_id: _Optional[str] = ..., target_epsilon: _Optional[float] = ..., target_delta: _Optional[float] = ..., accountant_type: _Optional[_Union[_common_pb2.AccountantType, str]] = ..., sample_rate: _Optional[float] = ...) -> None: ...

class CreateBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class GetBudgetRequest(_message.Message):
    __slots__ = ("budget_id",)
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    def __init__(self, budget_id: _Optional[str] = ...) -> None: ...

class GetBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...

class ListBudgetsRequest(_message.Message):
    __slots__ = ("page_size", "page_token", "session_id")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    session_id: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class ListBudgetsResponse(_message.Message):
    __slots__ = ("budgets", "next_page_token")
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[Budget]
    next_page_token: str
    def __init__(self, budgets: _Optional[_Iterable[_Union[Budget, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class RecordStepRequest(_message.Message):
    __slots__ = ("budget_id", "step_id", "noise_multiplier", "sample_rate", "num_steps")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_ID_FIELD_NUMBER: _ClassVar[int]
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    step_id: str
    noise_multiplier: float
    sample_rate: float
    num_steps: int
    def __init__(self, budget_id: _Optional[str] = ..., step_id: _Optional[str] = ..., noise_multiplier: _Optional[float] = ..., sample_rate: _Optional[float] = ..., num_steps: _Optional[int] = ...) -> None: ...

class RecordStepResponse(_message.Message):
    __slots__ = ("step", "budget", "duplicate")
    STEP_FIELD_NUMBER: _ClassVar[int]
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    step: StepRecord
    budget: Budget
    duplicate: bool
    def __init__(self, step: _Optional[_Union[StepRecord, _Mapping]] = ..., budget: _Optional[_Union[Budget, _Mapping]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ListStepsRequest(_message.Message):
    __slots__ = ("budget_id", "page_size", "page_token")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    page_size: int
    page_token: str
    def __init__(self, budget_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListStepsResponse(_message.Message):
    __slots__ = ("steps", "next_page_token")
    STEPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    steps: _containers.RepeatedCompositeFieldContainer[StepRecord]
    next_page_token: str
    def __init__(self, steps: _Optional[_Iterable[_Union[StepRecord, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetEpsilonRequest(_message.Message):
    __slots__ = ("budget_id", "delta")
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    delta: float
    def __init__(self, budget_id: _Optional[str] = ..., delta: _Optional[float] = ...) -> None: ...

class GetEpsilonResponse(_message.Message):
    __slots__ = ("epsilon", "delta", "num_steps", "accountant_type")
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_TYPE_FIELD_NUMBER: _ClassVar[int]
    epsilon: float
    delta: float
    num_steps: int
    accountant_type: _common_pb2.AccountantType
    def __init__(self, epsilon: _Optional[float] = ..., delta: _Optional[float] = ..., num_steps: _Optional[int] = ..., accountant_type: _Optional[_Union[_common_pb2.AccountantType, str]] = ...) -> None: ...

class CalibrateNoiseRequest(_message.Message):
    __slots__ = ("target_epsilon", "target_delta", "sample_rate", "num_steps", "accountant_type")
    TARGET_EPSILON_FIELD_NUMBER: _ClassVar[int]
    TARGET_DELTA_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_RATE_FIELD_NUMBER: _ClassVar[int]
    NUM_STEPS_FIELD_NUMBER: _ClassVar[int]
    ACCOUNTANT_TYPE_FIELD_NUMBER: _ClassVar[int]
    target_epsilon: float
    target_delta: float
    sample_rate: float
    num_steps: int
    accountant_type: _common_pb2.AccountantType
    def __init__(self, target_epsilon: _Optional[float] = ..., target_delta: _Optional[float] = ..., sample_rate: _Optional[float] = ..., num_steps: _Optional[int] = ..., accountant_type: _Optional[_Union[_common_pb2.AccountantType, str]] = ...) -> None: ...

class CalibrateNoiseResponse(_message.Message):
    __slots__ = ("noise_multiplier", "epsilon")
    NOISE_MULTIPLIER_FIELD_NUMBER: _ClassVar[int]
    EPSILON_FIELD_NUMBER: _ClassVar[int]
    noise_multiplier: float
    epsilon: float
    def __init__(self, noise_multiplier: _Optional[float] = ..., epsilon: _Optional[float] = ...) -> None: ...

class CloseBudgetRequest(_message.Message):
    __slots__ = ("budget_id",)
    BUDGET_ID_FIELD_NUMBER: _ClassVar[int]
    budget_id: str
    def __init__(self, budget_id: _Optional[str] = ...) -> None: ...

class CloseBudgetResponse(_message.Message):
    __slots__ = ("budget",)
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    budget: Budget
    def __init__(self, budget: _Optional[_Union[Budget, _Mapping]] = ...) -> None: ...
