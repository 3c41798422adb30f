"""The one pagination of every ``List*`` RPC (AIP-158).

``page_size``: 0 asks for the default (:data:`DEFAULT_PAGE_SIZE`, 100); anything above
:data:`MAX_PAGE_SIZE` (1000) is lowered to it (AIP-158 coerces, it does not refuse); a
negative size is INVALID_ARGUMENT naming ``page_size``. A page may hold fewer items;
``next_page_token`` is empty on the last page.

``page_token`` is opaque to clients. It is keyset: it carries the sort key of the last item
sent, so items added or removed between calls never shift a page (no duplicates, no gaps
among the items that stay), and it carries a short hash of the method and of the request's
filters, so a token is only accepted by the listing that issued it. A token that is too long,
not one we wrote, written for another method or other filters, or whose key does not have
the listing's shape is INVALID_ARGUMENT naming ``page_token``, never a silent restart from
the first page. The token holds no secret and grants nothing: it is a position, and every
query is still scoped to the caller's tenant by the store, never by the token.

Servicers call :func:`page_request` with the raw fields and pass ``req.after`` and
``req.limit`` (one more than the page, to know whether another page follows) as plain values
to the service; the store turns ``after`` into SQL with :func:`after_clause` (in-memory
listings use :func:`after_key`); the servicer ends with ``req.page(rows, key)``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, TypeGuard, TypeVar, overload

import sqlalchemy as sa

from .errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
#: Longest page_token accepted (characters); ours are well under 200.
MAX_TOKEN_CHARS = 512

_PREFIX = "p1."
Key = tuple[object, ...]
# The sort key of one listing, e.g. tuple[float, str] (created_at, id); see page_request's overloads.
KeyT = TypeVar("KeyT", bound=Key)


def _scope(method: str, filters: dict[str, object]) -> str:
    blob = json.dumps([method, sorted(filters.items())], separators=(",", ":"), default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _bad(message: str) -> InvalidArgument:
    return InvalidArgument("page_token", f"{message}; pass the next_page_token of the previous response "
                                         "of this same call, or empty for the first page")


@dataclass(frozen=True)
class PageRequest(Generic[KeyT]):
    """A parsed page request: ``size`` items wanted, after the key ``after`` (None: from the start)."""

    size: int
    after: KeyT | None
    scope: str

    @property
    def limit(self) -> int:
        """How many rows to fetch: one more than the page, to know whether another follows."""
        return self.size + 1

    def token(self, key: KeyT) -> str:
        raw = json.dumps([self.scope, list(key)], separators=(",", ":"), allow_nan=False).encode()
        return _PREFIX + base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    def page(self, rows: Sequence[T], key: Callable[[T], KeyT]) -> tuple[list[T], str]:
        """The page to send out of ``rows`` (fetched with :attr:`limit`), and its next_page_token."""
        page = list(rows[:self.size])
        return page, (self.token(key(page[-1])) if len(rows) > self.size and page else "")


@overload
def page_request(method: str, page_size: int, page_token: str, key_types: tuple[type[float], type[str]],
                 **filters: object) -> PageRequest[tuple[float, str]]: ...
@overload
def page_request(method: str, page_size: int, page_token: str, key_types: tuple[type[int]],
                 **filters: object) -> PageRequest[tuple[int]]: ...
@overload
def page_request(method: str, page_size: int, page_token: str, key_types: Sequence[type],
                 **filters: object) -> PageRequest[Any]: ...
def page_request(method: str, page_size: int, page_token: str, key_types: Sequence[type],
                 **filters: object) -> PageRequest[Any]:
    """Validate ``page_size``/``page_token`` of ``method`` (e.g. "vault.ListArtifacts").

    ``key_types`` is the shape of the listing's sort key (e.g. ``(float, str)``); ``filters`` are
    the request's filter fields, which a token is tied to.
    """
    if page_size < 0:
        raise InvalidArgument("page_size", f"must be >= 0 (0 = the default, {DEFAULT_PAGE_SIZE}; at most "
                                           f"{MAX_PAGE_SIZE} per page)")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    scope = _scope(method, filters)
    if not page_token:
        return PageRequest(size, None, scope)
    if len(page_token) > MAX_TOKEN_CHARS:
        raise _bad(f"is {len(page_token)} characters, more than any token this service gives ({MAX_TOKEN_CHARS})")
    if not page_token.startswith(_PREFIX):
        raise _bad("is not a token this service gave")
    body = page_token[len(_PREFIX):]
    try:
        decoded = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise _bad("is not a token this service gave") from None
    if not (_is_list(decoded) and len(decoded) == 2 and isinstance(decoded[0], str)
            and _is_list(decoded[1])):
        raise _bad("is not a token this service gave")
    if decoded[0] != scope:
        raise _bad(f"was given by another listing (not {method} with these filters)")
    key = decoded[1]
    if len(key) != len(key_types) or not all(_fits(v, t) for v, t in zip(key, key_types, strict=True)):
        raise _bad("is not a token this service gave")
    return PageRequest(size, tuple(float(v) if t is float else v for v, t in zip(key, key_types, strict=True)),
                       scope)


def _is_list(value: object) -> TypeGuard[list[Any]]:  # decoded JSON: its items are checked next
    return isinstance(value, list)


def _fits(value: object, kind: type) -> bool:
    if isinstance(value, bool):
        return False
    if kind is float:
        return isinstance(value, int | float) and math.isfinite(value)
    return isinstance(value, kind)


def after_clause(columns: Sequence[sa.ColumnElement[Any]], after: Key) -> sa.ColumnElement[bool]:
    """SQL for "sort key strictly after ``after``" over ``columns`` (the ORDER BY columns, ascending)."""
    if len(columns) == 1:
        return columns[0] > after[0]
    return sa.tuple_(*columns) > sa.tuple_(*(sa.literal(v) for v in after))


def after_key(items: Iterable[T], key: Callable[[T], Key], after: Key | None) -> list[T]:
    """In-memory listings: the items (already sorted by ``key``) whose key is strictly after ``after``."""
    items = list(items)
    return items if after is None else [i for i in items if key(i) > after]
