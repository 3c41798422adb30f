"""The ``tinker`` client's futures: pending and finished ops by request id, their outcomes (JSON, protobuf
bytes or a failure in the client's RequestFailedResponse terms), and expiry to 410 Gone."""

from __future__ import annotations

import collections
import concurrent.futures
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from tensafe.runtime.errors import FailedPrecondition, InvalidArgument, NotFound
from tg_tinker.errors import TGTinkerError

log = logging.getLogger("tensafe.tinker")

FUTURE_TTL_SECONDS = 900.0  # a finished future is kept this long for retrieval
USER_CODES = {"INVALID_ARGUMENT", "FAILED_PRECONDITION", "OUT_OF_RANGE", "RESOURCE_EXHAUSTED", "PERMISSION_DENIED",
              "NOT_FOUND", "ALREADY_EXISTS", "DP_BUDGET_EXCEEDED", "UNAUTHENTICATED"}


@dataclass
class Outcome:
    """What ``retrieve_future`` answers once the op is done: a JSON body, protobuf bytes, or a failure."""

    json: dict[str, Any] | None = None
    proto: bytes | None = None
    error: str | None = None
    category: str = "server"


@dataclass
class Box:
    request_id: str
    tenant: str
    future: concurrent.futures.Future[Outcome] = field(default_factory=concurrent.futures.Future[Outcome])
    done_at: float = 0.0


def failure(exc: BaseException) -> Outcome:
    """An op's exception as the client's RequestFailedResponse: its category says whose fault it was."""
    if isinstance(exc, TGTinkerError):
        code = exc.code
        msg = exc.message
        fld = getattr(exc, "field", None)
        if fld:
            msg = f"{msg} (field {fld})"
        return Outcome(error=f"{code}: {msg}", category="user" if code in USER_CODES else "server")
    if isinstance(exc, InvalidArgument | FailedPrecondition | NotFound):
        return Outcome(error=f"{exc.code.name}: {exc.message}", category="user")
    log.exception("op failed", exc_info=exc)
    return Outcome(error=f"INTERNAL: {type(exc).__name__}: {exc}", category="server")


class FutureTable:
    """Pending and finished futures by request id; a finished one is dropped FUTURE_TTL_SECONDS after it ended,
    and its id is then remembered as expired (``retrieve_future`` answers 410 Gone, as the client expects)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._boxes: dict[str, Box] = {}
        self._expired: collections.OrderedDict[str, None] = collections.OrderedDict()

    def new(self, tenant: str) -> Box:
        box = Box(uuid.uuid4().hex, tenant)
        box.future.add_done_callback(lambda _f: setattr(box, "done_at", time.monotonic()))
        with self._lock:
            self._boxes[box.request_id] = box
        return box

    def peek(self, request_id: str) -> Box | None:
        with self._lock:
            return self._boxes.get(request_id)

    def get(self, tenant: str, request_id: str) -> Box | None:
        """The box, None when expired (410); NotFound when unknown or another tenant's."""
        now = time.monotonic()
        with self._lock:
            for rid in [r for r, b in self._boxes.items() if b.done_at and now - b.done_at > FUTURE_TTL_SECONDS]:
                del self._boxes[rid]
                self._expired[rid] = None
            while len(self._expired) > 100_000:
                self._expired.popitem(last=False)
            box = self._boxes.get(request_id)
            if box is None and request_id in self._expired:
                return None
        if box is None or box.tenant != tenant:
            raise NotFound("future", request_id)
        return box
