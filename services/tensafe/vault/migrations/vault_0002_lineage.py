"""Vault: the lineage the trainer writes with each checkpoint it saves (NULL: a tenant's upload).

Revision ID: vault_0002_lineage
"""

import sqlalchemy as sa
from alembic import op

revision = "vault_0002_lineage"
down_revision = "vault_0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("vault_artifacts", sa.Column("lineage_json", sa.Text, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("vault_artifacts") as batch:
        batch.drop_column("lineage_json")
