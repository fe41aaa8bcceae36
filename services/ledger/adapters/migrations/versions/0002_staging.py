"""Staging tables: clearing results and meter energy held until their interval is due for settlement.

Revision ID: 0002
Revises: 0001
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "staged_clearings",
        sa.Column("market_id", sa.String(100), primary_key=True),
        sa.Column("interval_start_s", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("clearing_digest", sa.String(64), nullable=False),
        sa.Column("clearing_json", sa.Text(), nullable=False),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "staged_meter_energy",
        sa.Column("market_id", sa.String(100), primary_key=True),
        sa.Column("interval_start_s", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("participant_id", sa.String(100), primary_key=True),
        sa.Column("import_wh", sa.BigInteger(), nullable=False),
        sa.Column("export_wh", sa.BigInteger(), nullable=False),
        sa.Column("quality", sa.SmallInteger(), nullable=False),
        sa.Column("received_at_ms", sa.BigInteger(), nullable=False),
    )
    # One row per interval that received something since it was last settled.
    op.create_table(
        "pending_intervals",
        sa.Column("market_id", sa.String(100), primary_key=True),
        sa.Column("interval_start_s", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("version", sa.BigInteger(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("pending_intervals")
    op.drop_table("staged_meter_energy")
    op.drop_table("staged_clearings")
