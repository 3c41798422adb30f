"""Accountant tables: privacy budgets, recorded steps, step counts per (noise, sample rate).

Revision ID: accountant_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "accountant_0001"
down_revision = "rt_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "accountant_budgets",
        sa.Column("budget_id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(128), nullable=False),
        sa.Column("target_epsilon", sa.Double, nullable=False),
        sa.Column("target_delta", sa.Double, nullable=False),
        sa.Column("accountant", sa.String(16), nullable=False),
        sa.Column("sample_rate", sa.Double, nullable=False),
        sa.Column("spent_epsilon", sa.Double, nullable=False),
        sa.Column("num_steps", sa.BigInteger, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.BigInteger, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("tenant_id", "session_id", name="uq_accountant_budgets_session"),
    )
    op.create_index("ix_accountant_budgets_tenant", "accountant_budgets", ["tenant_id", "created_at"])
    op.create_table(
        "accountant_steps",
        sa.Column("budget_id", sa.String(64), sa.ForeignKey("accountant_budgets.budget_id"), primary_key=True),
        sa.Column("step_id", sa.String(256), primary_key=True),
        sa.Column("seq", sa.BigInteger, nullable=False),
        sa.Column("noise_multiplier", sa.Double, nullable=False),
        sa.Column("sample_rate", sa.Double, nullable=False),
        sa.Column("num_steps", sa.BigInteger, nullable=False),
        sa.Column("epsilon_after", sa.Double, nullable=False),
        sa.Column("recorded_at", sa.Float, nullable=False),
        sa.UniqueConstraint("budget_id", "seq", name="uq_accountant_steps_seq"),
    )
    op.create_table(
        "accountant_counts",
        sa.Column("budget_id", sa.String(64), sa.ForeignKey("accountant_budgets.budget_id"), primary_key=True),
        sa.Column("noise_multiplier", sa.Double, primary_key=True),
        sa.Column("sample_rate", sa.Double, primary_key=True),
        sa.Column("num_steps", sa.BigInteger, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("accountant_counts")
    op.drop_table("accountant_steps")
    op.drop_table("accountant_budgets")
