"""he tables: tenants' public CKKS contexts and the adapters loaded under them.

Revision ID: he_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "he_0001"
down_revision = "rt_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "he_contexts",
        sa.Column("tenant_id", sa.String(128), primary_key=True),
        sa.Column("key_id", sa.String(128), primary_key=True),
        sa.Column("public_context", sa.LargeBinary, nullable=False),
        sa.Column("sha256", sa.LargeBinary(32), nullable=False),
        sa.Column("poly_modulus_degree", sa.Integer, nullable=False),
        sa.Column("coeff_mod_bit_sizes", sa.String(256), nullable=False),
        sa.Column("scale_bits", sa.Integer, nullable=False),
        sa.Column("security_level", sa.Integer, nullable=False),
        sa.Column("has_relin_keys", sa.Boolean, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_table(
        "he_adapters",
        sa.Column("adapter_id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("artifact_id", sa.String(128), nullable=False),
        sa.Column("key_id", sa.String(128), nullable=False),
        sa.Column("layers", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_he_adapters_tenant", "he_adapters", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_table("he_adapters")
    op.drop_table("he_contexts")
