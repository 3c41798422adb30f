"""Idempotency records kept by every service.

Revision ID: rt_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "rt_0001"
down_revision = None
branch_labels = ("runtime",)
depends_on = None


def upgrade() -> None:
    op.create_table(
        "idempotency_records",
        sa.Column("tenant_id", sa.String(128), primary_key=True),
        sa.Column("method", sa.String(256), primary_key=True),
        sa.Column("idempotency_key", sa.String(128), primary_key=True),
        sa.Column("request_digest", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("status_code", sa.Integer, nullable=True),
        sa.Column("response", sa.LargeBinary, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_idempotency_created", "idempotency_records", ["created_at"])


def downgrade() -> None:
    op.drop_table("idempotency_records")
