"""API keys may expire (``tensafe keys create --expires-in``); NULL means never.

Revision ID: id_0003
"""

import sqlalchemy as sa
from alembic import op

revision = "id_0003"
down_revision = "id_0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.add_column(sa.Column("expires_at", sa.Float, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("api_keys") as batch:
        batch.drop_column("expires_at")
