"""The one exception of the transparency package."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import TGTinkerError

__all__ = ["VerificationError"]


class VerificationError(TGTinkerError):
    """A proof, checkpoint or signed note did not verify; the message names the failed check.

    ``details["check"]`` names the check (for example ``inclusion``, ``consistency``, ``note``,
    ``checkpoint``, ``rollback``, ``fork``); other details carry the indices and sizes involved.
    """

    def __init__(self, message: str, *, check: str = "verification", details: Mapping[str, Any] | None = None,
                 request_id: str | None = None, **extra: Any) -> None:
        super().__init__(message, code="VERIFICATION_FAILED", details={"check": check, **(details or {}), **extra},
                         request_id=request_id)
        self.check = check
