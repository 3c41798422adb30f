"""Durable outbox of audit entries waiting for the ledger.

Revision ID: rt_0002
"""

import sqlalchemy as sa
from alembic import op

revision = "rt_0002"
down_revision = "rt_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "audit_outbox",
        sa.Column("seq", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("entry_id", sa.String(64), nullable=False, unique=True),
        sa.Column("payload", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("audit_outbox")
