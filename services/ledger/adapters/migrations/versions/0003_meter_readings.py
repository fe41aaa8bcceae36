"""Staging of meter energy meter by meter, for participants with several meters reported in several batches.

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "staged_meter_readings",
        sa.Column("market_id", sa.String(100), primary_key=True),
        sa.Column("interval_start_s", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("meter_id", sa.String(100), primary_key=True),
        sa.Column("participant_id", sa.String(100), nullable=False),
        sa.Column("import_wh", sa.BigInteger(), nullable=False),
        sa.Column("export_wh", sa.BigInteger(), nullable=False),
        sa.Column("quality", sa.SmallInteger(), nullable=False),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("staged_meter_readings")
