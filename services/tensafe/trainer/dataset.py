"""Server-side Poisson sampling (``DPConfig.sampling = SERVER``): the trainer draws each logical batch itself.

With client sampling, the epsilon the accountant reports assumes the client Poisson-sampled its batches at the
declared rate; nothing on the server can check that. Here the dataset is a vault artifact of the tenant's, read
once when the session is created; N is its number of rows, q = expected batch size / N, and each ForwardBackward
draws every row independently with probability q from the operating system's CSPRNG (``secrets``), so the
reported epsilon is the trainer's own statement (attested). The ledger records the dataset's artifact id, its
SHA-256, N and q in the session's CreateSession entry.

The artifact: UTF-8 JSON lines, each ``{"input_ids": [ids...], "labels": [ids or -100...]}`` (``labels``
optional: then every token is a target), at most ``MAX_ROWS`` rows, each within the session's maximum length
and the base's vocabulary. Anything else is refused naming ``config.dp_config.dataset_artifact_id`` and the line.
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
from dataclasses import dataclass

import numpy as np
import torch

from tensafe.runtime.errors import InvalidArgument

from .batches import PreparedBatch

FIELD = "config.dp_config.dataset_artifact_id"
MAX_ROWS = 1_000_000
MAX_LINE_BYTES = 1 << 20
KEYS = frozenset({"input_ids", "labels"})


@dataclass(frozen=True)
class ServerDataset:
    artifact_id: str
    sha256: str                      # of the artifact's plaintext, as read
    rows: list[np.ndarray]           # int64 token ids, one array per row
    labels: list[np.ndarray | None]  # int64, or None: the row's own tokens

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def longest(self) -> int:
        return max(len(r) for r in self.rows)


def _ints(value: object, what: str, line: int, allow_ignore: bool = False) -> np.ndarray:
    if not isinstance(value, list) or not value:
        raise InvalidArgument(FIELD, f"line {line}: {what} must be a non-empty list of token ids")
    if not all(type(v) is int for v in value):  # bools are ints to isinstance: exactly int
        raise InvalidArgument(FIELD, f"line {line}: {what} must hold integers only")
    arr = np.asarray(value, dtype=np.int64)
    if (arr < (-100 if allow_ignore else 0)).any() or (allow_ignore and ((arr < 0) & (arr != -100)).any()):
        raise InvalidArgument(FIELD, f"line {line}: {what} has a negative id" + (" other than -100" if allow_ignore
                                                                                 else ""))
    return arr


def parse(data: bytes, artifact_id: str) -> ServerDataset:
    """Read and check the artifact's rows (sizes and types; the vocabulary is checked by :func:`check_tokens`)."""
    rows: list[np.ndarray] = []
    labels: list[np.ndarray | None] = []
    for number, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue
        if len(raw) > MAX_LINE_BYTES:
            raise InvalidArgument(FIELD, f"line {number} is longer than {MAX_LINE_BYTES} bytes")
        if len(rows) >= MAX_ROWS:
            raise InvalidArgument(FIELD, f"has more than {MAX_ROWS} rows")
        try:
            obj = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise InvalidArgument(FIELD, f"line {number} is not JSON ({exc.__class__.__name__})") from None
        if not isinstance(obj, dict) or "input_ids" not in obj or set(obj) - KEYS:  # pyright: ignore[reportUnknownArgumentType]
            raise InvalidArgument(FIELD, f"line {number}: each line is an object with input_ids and optionally "
                                         "labels, nothing else")
        ids = _ints(obj["input_ids"], "input_ids", number)
        lab = _ints(obj["labels"], "labels", number, allow_ignore=True) if "labels" in obj else None
        if lab is not None and len(lab) != len(ids):
            raise InvalidArgument(FIELD, f"line {number}: labels has {len(lab)} ids, input_ids {len(ids)}")
        if lab is not None and not (lab != -100).any():
            raise InvalidArgument(FIELD, f"line {number}: every label is -100 (the row trains nothing)")
        rows.append(ids)
        labels.append(lab)
    if not rows:
        raise InvalidArgument(FIELD, "holds no rows")
    return ServerDataset(artifact_id, hashlib.sha256(data).hexdigest(), rows, labels)


def check_tokens(ds: ServerDataset, vocab_size: int, max_length: int) -> None:
    for number, (ids, lab) in enumerate(zip(ds.rows, ds.labels, strict=True), start=1):
        if len(ids) > max_length:
            raise InvalidArgument(FIELD, f"row {number} has {len(ids)} tokens, more than the session's maximum "
                                         f"{max_length}")
        if int(ids.max()) >= vocab_size or (lab is not None and int(lab.max()) >= vocab_size):
            raise InvalidArgument(FIELD, f"row {number} has a token id outside the vocabulary [0, {vocab_size})")


class PoissonSampler:
    """Each row in with probability ``rate``, independently, from the OS CSPRNG. It walks the rows by geometric
    gaps (the number of rows skipped before the next one in is Geometric(rate)), which is the same distribution
    as one Bernoulli draw per row at O(rate x N) draws."""

    def __init__(self, size: int, rate: float) -> None:
        if size <= 0 or not 0 < rate <= 1:
            raise ValueError("size must be > 0 and rate in (0, 1]")
        self.size, self.rate = size, rate
        self._random = secrets.SystemRandom()
        self._log_miss = math.log1p(-rate) if rate < 1 else 0.0

    def draw(self) -> list[int]:
        if self.rate >= 1:
            return list(range(self.size))
        picked: list[int] = []
        index = -1
        while True:
            u = 1.0 - self._random.random()  # (0, 1]
            index += int(math.log(u) / self._log_miss) + 1
            if index >= self.size:
                return picked
            picked.append(index)


def batch(ds: ServerDataset, indices: list[int], ignore_index: int = -100) -> PreparedBatch:
    """The drawn rows, right-padded to the longest (padding attended by no one and trained on by no one)."""
    length = max(len(ds.rows[i]) for i in indices)
    ids = np.zeros((len(indices), length), dtype=np.int64)
    mask = np.zeros_like(ids)
    labels = np.full_like(ids, ignore_index)
    for r, i in enumerate(indices):
        row, lab = ds.rows[i], ds.labels[i]
        ids[r, :len(row)] = row
        mask[r, :len(row)] = 1
        labels[r, :len(row)] = row if lab is None else np.where(lab == -100, ignore_index, lab)
    return PreparedBatch(torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels))
