"""TenSafe SDK: privacy-first LoRA fine-tuning and serving over gRPC.

>>> from tg_tinker import ServiceClient
>>> with ServiceClient() as service:
...     service.check_health()
"""

from ._version import __version__
from .artifacts import ArtifactInfo, EncryptionInfo, TenantKeyInfo
from .client import ServiceClient
from .config import ClientConfig, RetryConfig
from .configs import DPConfig, LoRAConfig, LossConfig, OptimizerConfig, TrainingConfig
from .errors import (
    AuthenticationError,
    ConflictError,
    DeadlineTooShortError,
    DPBudgetExceededError,
    FutureCancelledError,
    FutureTimeoutError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    QuotaExceededError,
    RateLimitedError,
    ServerError,
    ServiceUnavailableError,
    TGTinkerError,
    ValidationError,
)
from .futures import FutureHandle
from .lineage import Lineage, LineageBudget
from .results import (
    CustomLossResult,
    ForwardBackwardResult,
    LoadStateResult,
    OptimStepResult,
    Sample,
    SampleResult,
    SaveStateResult,
    SessionInfo,
)
from .sampling import GenerationChunk, SamplingClient, TokenStream
from .training import TrainingClient

__all__ = [
    "__version__",
    "ServiceClient",
    "ClientConfig",
    "RetryConfig",
    "FutureHandle",
    "TrainingClient",
    "SamplingClient",
    "TokenStream",
    "GenerationChunk",
    "TrainingConfig",
    "LoRAConfig",
    "OptimizerConfig",
    "LossConfig",
    "DPConfig",
    "ForwardBackwardResult",
    "OptimStepResult",
    "SampleResult",
    "Sample",
    "SessionInfo",
    "CustomLossResult",
    "SaveStateResult",
    "LoadStateResult",
    "ArtifactInfo",
    "Lineage",
    "LineageBudget",
    "EncryptionInfo",
    "TenantKeyInfo",
    "TGTinkerError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ValidationError",
    "ConflictError",
    "QuotaExceededError",
    "RateLimitedError",
    "DeadlineTooShortError",
    "DPBudgetExceededError",
    "FutureTimeoutError",
    "FutureCancelledError",
    "IntegrityError",
    "ServiceUnavailableError",
    "ServerError",
]
