"""``FutureHandle``: the result of an operation that the server applies later, in order."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from .errors import FutureCancelledError, FutureTimeoutError

T = TypeVar("T")


class Outcome(Generic[T]):
    """The completion side of a :class:`FutureHandle`: the SDK's result stream sets it, once.

    The first :meth:`set_result` or :meth:`set_exception` wins; later ones are ignored (a result may
    race with a cancellation or with the stream's end).
    """

    def __init__(self) -> None:
        self.future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self.future.set_running_or_notify_cancel()

    def set_result(self, value: T) -> None:
        if not self.future.done():
            self.future.set_result(value)

    def set_exception(self, exc: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(exc)


class FutureHandle(Generic[T]):
    """A handle on a queued operation.

    Training calls return one at once, so a client may queue ``forward_backward``
    and ``optim_step`` before waiting on either; the server applies them in the
    order they were submitted. ``result(timeout)`` blocks until the operation
    ends and returns its result or raises its error. ``outcome`` is the side that completes it.
    """

    def __init__(self, future_id: str, *, session_id: str | None = None,
                 canceller: Callable[[str], bool] | None = None, outcome: Outcome[T] | None = None) -> None:
        self.future_id = future_id
        self.session_id = session_id
        self._canceller = canceller
        self._outcome: Outcome[T] = outcome if outcome is not None else Outcome()
        self._future = self._outcome.future

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"FutureHandle({self.future_id!r}, {state})"

    def result(self, timeout: float | None = None) -> T:
        """Wait up to ``timeout`` seconds (forever if None) and return the result.

        Raises :class:`FutureTimeoutError` if it is not done in time (the operation
        goes on), :class:`FutureCancelledError` if it was cancelled, or the
        operation's own error.
        """
        try:
            return self._future.result(timeout)
        except concurrent.futures.TimeoutError:
            raise FutureTimeoutError(
                f"operation {self.future_id} did not finish within {timeout}s", code="FUTURE_TIMEOUT"
            ) from None

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The operation's error, or None if it succeeded; waits like :meth:`result`."""
        try:
            return self._future.exception(timeout)
        except concurrent.futures.TimeoutError:
            raise FutureTimeoutError(
                f"operation {self.future_id} did not finish within {timeout}s", code="FUTURE_TIMEOUT"
            ) from None

    def done(self) -> bool:
        """True once the operation succeeded, failed or was cancelled."""
        return self._future.done()

    def cancelled(self) -> bool:
        exc = self._future.exception() if self._future.done() else None
        return isinstance(exc, FutureCancelledError)

    def cancel(self) -> bool:
        """Ask the server to cancel the operation; True if it had not started, or was a running sample
        (stopped between two tokens), and is now cancelled."""
        if self._future.done():
            return False
        if self._canceller is None or not self._canceller(self.future_id):
            return False
        self._outcome.set_exception(FutureCancelledError(f"operation {self.future_id} was cancelled",
                                                         code="FUTURE_CANCELLED"))
        return True

    def add_done_callback(self, fn: Callable[[FutureHandle[T]], Any]) -> None:
        """Call ``fn(self)`` when the operation ends (at once if it already has)."""
        self._future.add_done_callback(lambda _f: fn(self))
