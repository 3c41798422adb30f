"""TenSafe SDK: privacy-first LoRA fine-tuning and serving over gRPC.

>>> from tg_tinker import ServiceClient
>>> with ServiceClient() as service:
...     service.check_health()
"""

from ._version import __version__
from .client import ServiceClient
from .config import ClientConfig, RetryConfig
from .errors import (
    AuthenticationError,
    ConflictError,
    DPBudgetExceededError,
    FutureCancelledError,
    FutureTimeoutError,
    IntegrityError,
    NotFoundError,
    PermissionDeniedError,
    RateLimitedError,
    ServerError,
    ServiceUnavailableError,
    TGTinkerError,
    ValidationError,
)
from .futures import FutureHandle

__all__ = [
    "__version__",
    "ServiceClient",
    "ClientConfig",
    "RetryConfig",
    "FutureHandle",
    "TGTinkerError",
    "AuthenticationError",
    "PermissionDeniedError",
    "NotFoundError",
    "ValidationError",
    "ConflictError",
    "RateLimitedError",
    "DPBudgetExceededError",
    "FutureTimeoutError",
    "FutureCancelledError",
    "IntegrityError",
    "ServiceUnavailableError",
    "ServerError",
]
