"""Vault tables: tenant key versions and artifact records.

Revision ID: vault_0001
"""

import sqlalchemy as sa
from alembic import op

revision = "vault_0001"
down_revision = "rt_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "vault_tenants",
        sa.Column("tenant_id", sa.String(128), primary_key=True),
        sa.Column("key_id", sa.String(64), nullable=False),
        sa.Column("current_version", sa.Integer, nullable=False),
        sa.Column("shredded_at", sa.Float, nullable=True),
    )
    op.create_table(
        "vault_keks",
        sa.Column("tenant_id", sa.String(128), primary_key=True),
        sa.Column("version", sa.Integer, primary_key=True),
        sa.Column("wrapped_kek", sa.LargeBinary, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("destroyed_at", sa.Float, nullable=True),
    )
    op.create_table(
        "vault_artifacts",
        sa.Column("artifact_id", sa.String(64), primary_key=True),
        sa.Column("tenant_id", sa.String(128), nullable=False),
        sa.Column("kind", sa.Integer, nullable=False),
        sa.Column("name", sa.String(256), nullable=False),
        sa.Column("content_type", sa.String(128), nullable=False),
        sa.Column("session_id", sa.String(64), nullable=False),
        sa.Column("metadata_json", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("plaintext_sha256", sa.LargeBinary, nullable=False),
        sa.Column("stored_size", sa.BigInteger, nullable=False),
        sa.Column("format_version", sa.Integer, nullable=False),
        sa.Column("segment_size", sa.Integer, nullable=False),
        sa.Column("kek_version", sa.Integer, nullable=False),
        sa.Column("wrapped_dek", sa.LargeBinary, nullable=True),
        sa.Column("blob_key", sa.String(128), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
    )
    op.create_index("ix_vault_artifacts_tenant", "vault_artifacts", ["tenant_id", "created_at"])


def downgrade() -> None:
    op.drop_table("vault_artifacts")
    op.drop_table("vault_keks")
    op.drop_table("vault_tenants")
