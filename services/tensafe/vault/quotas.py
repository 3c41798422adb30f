"""Per-tenant storage quotas of the vault: stored bytes (``TENSAFE_QUOTA_STORED_MB``) and artifacts
(``TENSAFE_QUOTA_ARTIFACTS``).

Usage is what the tenant's artifact records say (the sum of their stored sizes, and their count:
shredded artifacts still take room until deleted), plus the uploads in flight in this process. A
put is refused before any byte is read when the tenant already has its most artifacts, and while it
streams as soon as the bytes received so far, with the tenant's stored bytes and its other uploads
in flight, pass the quota (the upload stops there: the rest is not read). Either way nothing is kept
(the partial blob is removed). The record is inserted under a per-tenant lock after a last check on
the exact stored size against the records as they are then, so concurrent puts cannot together pass
the quota. The vault is one process per deployment (the lock is in-process).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from tensafe.runtime.errors import QuotaExceeded

MIB = 1 << 20


@dataclass(frozen=True)
class StorageLimits:
    stored_bytes: int   # 0: no quota
    artifacts: int      # 0: no quota

    @classmethod
    def from_config(cls, stored_mb: int, artifacts: int) -> StorageLimits:
        return cls(stored_bytes=stored_mb * MIB, artifacts=artifacts)


class Upload:
    """One put in flight: counts its bytes as they arrive and refuses the one that passes the quota.
    It counts among the tenant's uploads in flight from its first bytes until :meth:`end`."""

    def __init__(self, quotas: StorageQuotas, tenant_id: str, stored_before: int) -> None:
        self.quotas = quotas
        self.tenant_id = tenant_id
        self.stored_before = stored_before
        self.received = 0
        self._registered = False

    def add(self, nbytes: int) -> None:
        limit = self.quotas.limits.stored_bytes
        with self.quotas.lock:
            if not self._registered:
                self.quotas._uploads.setdefault(self.tenant_id, []).append(self)
                self._registered = True
            self.received += nbytes
            in_flight = self.quotas.in_flight(self.tenant_id)
        if limit and self.stored_before + in_flight > limit:
            raise self.quotas.stored_exceeded(self.stored_before + in_flight)

    def end(self) -> None:
        with self.quotas.lock:
            if not self._registered:
                return
            self._registered = False
            uploads = self.quotas._uploads.get(self.tenant_id, [])
            if self in uploads:
                uploads.remove(self)
            if not uploads:
                self.quotas._uploads.pop(self.tenant_id, None)

    def commit(self, stored_size: int, insert: Callable[[], None]) -> None:
        """Insert the record (``insert``) if ``stored_size`` more bytes still fit, under the tenant's lock."""
        limits = self.quotas.limits
        try:
            with self.quotas.tenant_lock(self.tenant_id):
                if limits.stored_bytes or limits.artifacts:
                    stored, count = self.quotas.usage(self.tenant_id)
                    if limits.artifacts and count >= limits.artifacts:
                        raise self.quotas.count_exceeded(count)
                    if limits.stored_bytes and stored + stored_size > limits.stored_bytes:
                        raise self.quotas.stored_exceeded(stored + stored_size)
                insert()
        finally:
            self.end()


class StorageQuotas:
    def __init__(self, limits: StorageLimits, usage: Callable[[str], tuple[int, int]]) -> None:
        self.limits = limits
        self.usage = usage                  # tenant -> (stored bytes, artifacts), from the records
        self.lock = threading.Lock()
        self._uploads: dict[str, list[Upload]] = {}
        self._tenant_locks: dict[str, threading.Lock] = {}

    def in_flight(self, tenant_id: str) -> int:
        return sum(u.received for u in self._uploads.get(tenant_id, ()))

    def tenant_lock(self, tenant_id: str) -> threading.Lock:
        with self.lock:
            return self._tenant_locks.setdefault(tenant_id, threading.Lock())

    def begin(self, tenant_id: str) -> Upload:
        """A new upload of ``tenant_id``; refused at once when its artifacts quota is reached."""
        if not (self.limits.stored_bytes or self.limits.artifacts):
            return Upload(self, tenant_id, 0)
        stored, count = self.usage(tenant_id)
        with self.lock:
            pending = len(self._uploads.get(tenant_id, ()))
        if self.limits.artifacts and count + pending >= self.limits.artifacts:
            raise self.count_exceeded(count + pending)
        return Upload(self, tenant_id, stored)

    def stored_exceeded(self, would_be: int) -> QuotaExceeded:
        limit = self.limits.stored_bytes
        return QuotaExceeded("TENSAFE_QUOTA_STORED_MB", f"this upload would bring the tenant's stored artifacts past "
                             f"{limit // MIB} MiB (at least {would_be} bytes); nothing of it was kept. Delete "
                             "artifacts to make room", limit=limit, current=would_be)

    def count_exceeded(self, count: int) -> QuotaExceeded:
        limit = self.limits.artifacts
        return QuotaExceeded("TENSAFE_QUOTA_ARTIFACTS", f"the tenant stores {count} artifacts, the most allowed; "
                             "nothing was read. Delete artifacts to make room", limit=limit, current=count)


__all__ = ["StorageLimits", "StorageQuotas", "Upload"]
