"""What the gateway holds in memory for the ``tinker`` client (its protocol state, no data): the client's
sessions, its models (each a trainer session, with the ``seq_id`` it expects next) and its samplers."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from tg_tinker.sampling import SamplingClient
from tg_tinker.training import TrainingClient

from .futures import Box


@dataclass
class Model:
    model_id: str
    tenant: str
    key_id: str
    session_id: str  # the client's session
    base_model: str  # as the client named it
    local_ref: str
    rank: int
    train: tuple[bool, bool, bool]  # mlp, attn, unembed
    tc: TrainingClient | None = None
    dp: bool = False
    created: Box | None = None  # the create_model (or create-from-state) future
    next_seq: int = 1
    waiting: dict[int, Callable[[], None]] = field(default_factory=dict[int, Callable[[], None]])
    seen: dict[int, str] = field(default_factory=dict[int, str])
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def run_id(self) -> str:
        """The training run in ``tinker://`` paths: the trainer session's id."""
        assert self.tc is not None
        return self.tc.session_id


@dataclass
class Sampler:
    sampler_id: str
    tenant: str
    base_model: str
    local_ref: str
    model_path: str | None
    artifact_id: str | None
    client: SamplingClient
    scorer: TrainingClient | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class ClientSession:
    session_id: str
    tenant: str
    last_seen: float
    models: list[str] = field(default_factory=list[str])
    samplers: list[str] = field(default_factory=list[str])
    finished: bool = False
