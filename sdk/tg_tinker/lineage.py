"""Artifact and session lineage: how the weights were made, as the TenSafe services recorded it."""

from __future__ import annotations

from dataclasses import dataclass, field

from tensafe.api.common.v1 import common_pb2


@dataclass(frozen=True)
class LineageBudget:
    budget_id: str
    epsilon: float       # spent when the artifact was saved (for a session: now), at ``delta``
    delta: float


@dataclass(frozen=True)
class Lineage:
    """``attested``: recorded by the trainer (False: an artifact you uploaded; nothing else is known).

    A DP result is covered by its budgets' epsilon only when ``non_private_steps == 0`` and not
    ``external_ancestry``: see :attr:`dp_covered`.
    """

    attested: bool
    parent_artifact_id: str = ""
    session_id: str = ""
    budgets: list[LineageBudget] = field(default_factory=list)
    non_private_steps: int = 0
    private_steps: int = 0
    external_ancestry: bool = False

    @property
    def dp_covered(self) -> bool:
        """True when every step in the ancestry was DP and every ancestor was attested."""
        return self.attested and not self.external_ancestry and self.non_private_steps == 0

    @classmethod
    def from_proto(cls, m: common_pb2.Lineage) -> Lineage:
        return cls(m.attested, m.parent_artifact_id, m.session_id,
                   [LineageBudget(b.budget_id, b.epsilon, b.delta) for b in m.budgets],
                   m.non_private_steps, m.private_steps, m.external_ancestry)
