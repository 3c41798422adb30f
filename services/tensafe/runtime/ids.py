"""Identifier formats, checked at the edge for every request, and bounded copies of strings.

Every string field of a request named ``*_id`` and every repeated string field named ``*_ids``,
at any depth, must be empty (the service decides whether the field is required) or match
:data:`ID_PATTERN`: 1 to 128 characters, letters, digits, ``.``, ``_``, ``:`` and ``-``, starting
with a letter or digit. Every id the services make fits it (``art_<24 hex>``, ``ses_<16 hex>``,
``fut_<16 hex>``, ``bud_<24 hex>``, ``key_<16 hex>``, ``hea_``/``hec_<24 hex>``, ``adp_<16 hex>``,
DP step ids ``<session id>:u<n>``), and so do the ids tenants choose (HE key ids, tenant names).
Anything else is INVALID_ARGUMENT naming the field (dotted path, with ``[i]`` for repeated fields),
before any service logic runs. The ledger's ``AppendEntries`` is exempt: only the services call it,
and the ledger bounds each entry itself (``runtime.audit.entry_problem``).

:func:`bounded` is how a string of any size is copied where space is limited (audit entries,
log lines): unchanged when short, otherwise its start followed by ``…sha256:<16 hex>`` of the
whole, so that the copy stays recognisable and the original can still be matched.
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Iterator
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from .errors import InvalidArgument

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
ID_RE = re.compile(ID_PATTERN)
MAX_ID = 128

# Methods whose requests the services alone send, validated by the service itself.
EXEMPT_METHODS = frozenset({"/tensafe.api.ledger.v1.LedgerService/AppendEntries"})
# Free-form values, never ids: their keys are not fields.
_OPAQUE = frozenset({"google.protobuf.Struct", "google.protobuf.Value", "google.protobuf.ListValue",
                     "google.protobuf.Any"})


def bounded(text: str, limit: int = MAX_ID) -> str:
    """``text`` if it has at most ``limit`` characters, else its start + ``…sha256:<16 hex>`` (``limit`` long)."""
    if len(text) <= limit:
        return text
    suffix = "…sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return text[:max(0, limit - len(suffix))] + suffix


def check_id(field: str, value: str) -> None:
    if value and (len(value) > MAX_ID or not ID_RE.match(value)):
        shown = bounded(value, 40)
        raise InvalidArgument(field, f"{shown!r} is not an id: use 1-{MAX_ID} letters, digits, '.', '_', ':' or '-', "
                                     "starting with a letter or digit")


@functools.cache
def _plan(descriptor: Descriptor) -> tuple[tuple[str, str, Descriptor | None], ...]:
    """(field name, kind, message type) of the fields to look at: ids, id lists, messages holding ids."""
    return _plan_of(descriptor, frozenset())


def _plan_of(descriptor: Descriptor, seen: frozenset[str]) -> tuple[tuple[str, str, Descriptor | None], ...]:
    seen = seen | {descriptor.full_name}
    out: list[tuple[str, str, Descriptor | None]] = []
    for f in descriptor.fields:
        repeated = f.is_repeated
        if f.type == FieldDescriptor.TYPE_STRING:
            if f.name.endswith("_ids") and repeated:
                out.append((f.name, "ids", None))
            elif f.name.endswith("_id") and not repeated:
                out.append((f.name, "id", None))
        elif f.type == FieldDescriptor.TYPE_MESSAGE:
            sub = f.message_type
            if sub is None or sub.GetOptions().map_entry or sub.full_name in _OPAQUE or sub.full_name in seen:
                continue
            if _plan_of(sub, seen):
                out.append((f.name, "msgs" if repeated else "msg", sub))
    return tuple(out)


def check_request_ids(message: Any, prefix: str = "") -> None:
    """Raise InvalidArgument naming the first id field of ``message`` that is not an id."""
    for name, kind, _sub in _plan(message.DESCRIPTOR):
        where = prefix + name
        if kind == "id":
            check_id(where, getattr(message, name))
        elif kind == "ids":
            for i, value in enumerate(getattr(message, name)):
                check_id(f"{where}[{i}]", value)
        elif kind == "msg":
            if message.HasField(name):
                check_request_ids(getattr(message, name), where + ".")
        else:
            for i, item in enumerate(getattr(message, name)):
                check_request_ids(item, f"{where}[{i}].")


def checked_stream(requests: Iterator[Any]) -> Iterator[Any]:
    """A client stream whose every message is checked as the service reads it."""
    for message in requests:
        check_request_ids(message)
        yield message
