"""A run's training data: a local JSONL file (one ``{"text": ...}`` object per line) or a vault artifact.

``dataset`` is a path (``str`` or ``Path``) to a JSONL file, or ``"vault:<artifact_id>"``: an artifact of
the tenant's, read from the vault as the tenant (its bytes are the same JSONL). Bounded: at most
:data:`MAX_ROWS` rows of at most :data:`MAX_TEXT_CHARS` characters, :data:`MAX_BYTES` in all; a line that is
not a JSON object with a non-empty string ``text`` is refused naming its line number.
"""

from __future__ import annotations

import json
from pathlib import Path

from tensafe.runtime.errors import InvalidArgument

from .services import TenantServices

VAULT_PREFIX = "vault:"
MAX_ROWS = 10_000_000
MAX_TEXT_CHARS = 1 << 20
MAX_BYTES = 8 << 30


def parse_jsonl(data: bytes, what: str = "dataset") -> list[str]:
    if len(data) > MAX_BYTES:
        raise InvalidArgument(what, f"is larger than {MAX_BYTES} bytes")
    texts: list[str] = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except (UnicodeDecodeError, ValueError):
            raise InvalidArgument(what, f"line {number} is not JSON") from None
        text = row.get("text") if isinstance(row, dict) else None
        if not isinstance(text, str) or not text:
            raise InvalidArgument(what, f'line {number} is not an object with a non-empty string "text"')
        if len(text) > MAX_TEXT_CHARS:
            raise InvalidArgument(what, f"line {number} is longer than {MAX_TEXT_CHARS} characters")
        texts.append(text)
        if len(texts) > MAX_ROWS:
            raise InvalidArgument(what, f"has more than {MAX_ROWS} rows")
    if not texts:
        raise InvalidArgument(what, "has no rows")
    return texts


def load(dataset: str | Path, services: TenantServices) -> list[str]:
    if isinstance(dataset, str) and dataset.startswith(VAULT_PREFIX):
        artifact_id = dataset[len(VAULT_PREFIX):]
        if not artifact_id or len(artifact_id) > 64:
            raise InvalidArgument("dataset", "vault:<artifact_id> names an artifact id of at most 64 characters")
        _, data = services.vault.get(services.caller, artifact_id)
        return parse_jsonl(data)
    if not isinstance(dataset, (str, Path)):
        raise InvalidArgument("dataset", 'must be a JSONL path or "vault:<artifact_id>"')
    path = Path(dataset)
    if not path.is_file():
        raise InvalidArgument("dataset", f"{path} is not a file")
    if path.stat().st_size > MAX_BYTES:
        raise InvalidArgument("dataset", f"is larger than {MAX_BYTES} bytes")
    return parse_jsonl(path.read_bytes())
