"""storage commitment: per delivery, the commitment state, the Transaction UID of the latest
N-ACTION and when it was asked and answered

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 12:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.add_column(sa.Column("commitment", sa.String(length=16), nullable=True))
        batch_op.add_column(sa.Column("commit_uid", sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column("commit_requested_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("committed_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f("ix_deliveries_commit_uid"), ["commit_uid"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("deliveries", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_deliveries_commit_uid"))
        batch_op.drop_column("committed_at")
        batch_op.drop_column("commit_requested_at")
        batch_op.drop_column("commit_uid")
        batch_op.drop_column("commitment")
