"""result versions: the version key of each result object, the study's current version, and
this installation's identity (Device Observer UID, serial number) kept for its results, and
a running job's current stage

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25 09:00:00.000000
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("result_objects", schema=None) as batch_op:
        batch_op.add_column(sa.Column("version_key", sa.String(length=64), nullable=True))
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.add_column(sa.Column("result_version", sa.String(length=64), nullable=True))
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("stage", sa.String(length=32), nullable=True))
    op.create_table(
        "installation",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_uid", sa.String(length=64), nullable=False),
        sa.Column("serial_number", sa.String(length=64), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    op.drop_table("installation")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("stage")
    with op.batch_alter_table("studies", schema=None) as batch_op:
        batch_op.drop_column("result_version")
    with op.batch_alter_table("result_objects", schema=None) as batch_op:
        batch_op.drop_column("version_key")
