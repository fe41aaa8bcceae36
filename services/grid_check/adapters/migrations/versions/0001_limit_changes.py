"""Line limits set by operators, one row per line and range of intervals, kept in the order they were set.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "gc_limit_changes",
        # The order limits were set in: a later row wins over an earlier one for the same interval.
        sa.Column(
            "seq", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("line_id", sa.String(128), nullable=False),
        sa.Column("start_s", sa.BigInteger(), nullable=False),
        # Exclusive; NULL means every later interval.
        sa.Column("until_s", sa.BigInteger(), nullable=True),
        sa.Column("capacity_w", sa.BigInteger(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("set_by", sa.String(128), nullable=False),
        sa.Column("set_at_s", sa.Float(), nullable=False),
        sa.CheckConstraint("capacity_w >= 0", name="ck_gc_limit_changes_capacity"),
        sa.CheckConstraint("until_s IS NULL OR until_s > start_s", name="ck_gc_limit_changes_range"),
    )


def downgrade() -> None:
    op.drop_table("gc_limit_changes")
