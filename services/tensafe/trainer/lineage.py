"""A session's lineage: what shaped its weights, as the trainer saw it happen.

A session starts with an empty lineage. Loading an artifact (LoadState) merges the artifact's
lineage AS THE VAULT RECORDED IT (never what the checkpoint's own files say): its DP budgets, its
private and non-private steps, and whether some ancestor was a tenant's upload (unattested). The
session's own optimizer steps are added on top: a DP session's budget with its current epsilon, a
non-DP session's steps as non-private. Merging is conservative: what a load replaced is not
forgotten (an optimizer state kept across a load, for one, still carries the earlier gradients),
so a lineage lists everything that may have shaped the weights. Saving writes this lineage with
the checkpoint (see tensafe.runtime.lineage for how the vault authenticates it).

The rules a DP session follows when it loads an artifact:
- every budget of an attested lineage must be the session's own budget (continue it:
  ``dp_config.budget_id``), otherwise the load is refused as before (FAILED_PRECONDITION naming the
  budget): loading a checkpoint never gives spent privacy back, whatever was done to it between;
- non-private steps in the ancestry are allowed but reported (``lineage.non_private_steps``):
  epsilon then covers only the DP steps, not the weights;
- an unattested artifact (uploaded by a tenant) is allowed but reported
  (``lineage.external_ancestry``): TenSafe cannot know how it was trained.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tensafe.api.common.v1 import common_pb2
from tensafe.runtime.errors import FailedPrecondition
from tensafe.runtime.lineage import MAX_BUDGETS


@dataclass
class SessionLineage:
    parent_artifact_id: str = ""
    # Inherited from loaded artifacts: budget id -> (epsilon at save, delta).
    budgets: dict[str, tuple[float, float]] = field(default_factory=dict)
    non_private_steps: int = 0
    private_steps: int = 0
    external_ancestry: bool = False
    # The session's own applied updates.
    own_non_private_steps: int = 0
    own_private_steps: int = 0

    def check_load(self, lineage: common_pb2.Lineage, budget_id: str | None) -> None:
        """Refuse what a load may not do (before anything is changed). ``budget_id``: a DP session's."""
        incoming = {b.budget_id for b in lineage.budgets} if lineage.attested else set()
        if budget_id is not None and incoming - {budget_id}:
            other = sorted(incoming - {budget_id})
            first = next(b for b in lineage.budgets if b.budget_id == other[0])
            if len(incoming) > 1:
                raise FailedPrecondition(
                    f"this checkpoint's lineage holds DP budgets {', '.join(sorted(incoming))}: a DP session "
                    "continues one budget only, and loading a checkpoint does not give spent budget back",
                    budget_id=other[0])
            raise FailedPrecondition(
                f"this checkpoint was trained with DP under budget {other[0]} (epsilon {first.epsilon:.4g} spent "
                f"when saved, per its lineage): loading it does not give spent budget back. Continue that budget: "
                f"create the session with dp_config.budget_id={other[0]!r} and the same noise_multiplier",
                budget_id=other[0])
        if len(set(self.budgets) | incoming) > MAX_BUDGETS:
            raise FailedPrecondition(f"a lineage names at most {MAX_BUDGETS} DP budgets; this load would make it "
                                     "more")

    def absorb(self, lineage: common_pb2.Lineage, artifact_id: str) -> None:
        """Merge a loaded artifact's lineage (called once its load is past every check)."""
        self.parent_artifact_id = artifact_id
        if not lineage.attested:
            self.external_ancestry = True
            return
        for b in lineage.budgets:
            eps, delta = self.budgets.get(b.budget_id, (0.0, b.delta))
            self.budgets[b.budget_id] = (max(eps, b.epsilon), b.delta or delta)
        self.non_private_steps += lineage.non_private_steps
        self.private_steps += lineage.private_steps
        self.external_ancestry = self.external_ancestry or lineage.external_ancestry

    def proto(self, session_id: str, dp: Any = None) -> common_pb2.Lineage:
        """The lineage now: inherited plus the session's own steps (``dp``: a DP session's DPState)."""
        budgets = dict(self.budgets)
        if dp is not None and dp.budget_id:
            eps, _ = budgets.get(dp.budget_id, (0.0, dp.target_delta))
            budgets[dp.budget_id] = (max(eps, dp.total_epsilon), dp.target_delta)
        return common_pb2.Lineage(
            attested=True, parent_artifact_id=self.parent_artifact_id, session_id=session_id,
            budgets=[common_pb2.LineageBudget(budget_id=b, epsilon=e, delta=d)
                     for b, (e, d) in sorted(budgets.items())],
            non_private_steps=self.non_private_steps + self.own_non_private_steps,
            private_steps=self.private_steps + self.own_private_steps,
            external_ancestry=self.external_ancestry)
