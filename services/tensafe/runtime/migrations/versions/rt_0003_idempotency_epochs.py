"""Idempotency keys remember which process holds them, so that a crashed process's keys are released.

Revision ID: rt_0003
"""

import sqlalchemy as sa
from alembic import op

revision = "rt_0003"
down_revision = "rt_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("idempotency_records") as batch:
        batch.add_column(sa.Column("epoch", sa.String(64), nullable=True))
    op.create_index("ix_idempotency_epoch", "idempotency_records", ["epoch"])
    op.create_table(
        "idempotency_epochs",
        sa.Column("epoch", sa.String(64), primary_key=True),
        sa.Column("instance", sa.String(256), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("heartbeat_at", sa.Float, nullable=False),
    )
    op.create_index("ix_idempotency_epochs_instance", "idempotency_epochs", ["instance"])


def downgrade() -> None:
    op.drop_table("idempotency_epochs")
    op.drop_index("ix_idempotency_epoch", "idempotency_records")
    with op.batch_alter_table("idempotency_records") as batch:
        batch.drop_column("epoch")
