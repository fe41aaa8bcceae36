"""Each meter's validation and interval energy state, saved so a restart neither loses nor repeats energy.

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
        "mi_meter_state",
        sa.Column("meter_id", sa.String(128), primary_key=True),
        # JSON from MeterEnergyPipeline.snapshot(): counters, interval energy in progress, pending intervals.
        sa.Column("state_json", sa.Text(), nullable=False),
        # The interval length the state was computed with; a different one starts the meter afresh.
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("saved_at_s", sa.Float(), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("mi_meter_state")
