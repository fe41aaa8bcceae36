"""Participants, meters, the book sequence, orders, frozen and cleared intervals, and fills.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def _big() -> sa.types.TypeEngine[int]:
    # On SQLite an INTEGER PRIMARY KEY is the rowid: the cheapest possible key.
    return sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "ob_participants",
        sa.Column("participant_id", sa.String(64), primary_key=True),
        sa.Column("public_key", sa.LargeBinary(), nullable=False, unique=True),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("display_name", sa.String(64), nullable=False),
        sa.Column("registered_at_s", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "ob_meters",
        sa.Column("meter_id", sa.String(64), primary_key=True),
        sa.Column("participant_id", sa.String(64), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("registered_at_s", sa.BigInteger(), nullable=False),
    )
    op.create_index("ix_ob_meters_participant", "ob_meters", ["participant_id"])
    op.create_table(
        "ob_book_state",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
        # The first interval that could ever hold orders: gate closures start here.
        sa.Column("first_interval_start_s", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "ob_orders",
        sa.Column("book_seq", _big(), primary_key=True, autoincrement=False),
        sa.Column("order_id", sa.String(32), nullable=False, unique=True),
        sa.Column("participant_id", sa.String(64), nullable=False),
        sa.Column("client_order_id", sa.String(64), nullable=False),
        sa.Column("side", sa.SmallInteger(), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("interval_start_s", sa.BigInteger(), nullable=False),
        sa.Column("energy_wh", sa.BigInteger(), nullable=False),
        sa.Column("price_micro_per_kwh", sa.BigInteger(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("accepted_at_s", sa.BigInteger(), nullable=False),
        sa.Column("replaces_order_id", sa.String(32), nullable=True),
        sa.Column("replaced_by_order_id", sa.String(32), nullable=True),
        sa.Column("accepted_wh", sa.BigInteger(), nullable=True),
        sa.Column("fill_price_micro_per_kwh", sa.BigInteger(), nullable=True),
        sa.UniqueConstraint("participant_id", "client_order_id", name="uq_ob_orders_client_order_id"),
    )
    op.create_index("ix_ob_orders_interval", "ob_orders", ["interval_start_s"])
    op.create_table(
        "ob_intervals",
        sa.Column("interval_start_s", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("gate_closure_s", sa.BigInteger(), nullable=False),
        sa.Column("book_seq_max", sa.BigInteger(), nullable=False),
        sa.Column("frozen_at_s", sa.Float(), nullable=False),
        sa.Column("orders_frozen", sa.BigInteger(), nullable=False),
        sa.Column("cleared_at_s", sa.Float(), nullable=True),
        sa.Column("volume_wh", sa.BigInteger(), nullable=True),
        sa.Column("node_prices_json", sa.Text(), nullable=True),
        sa.Column("result_event_id", sa.String(128), nullable=True),
    )
    op.create_table(
        "ob_fills",
        sa.Column("fill_seq", _big(), primary_key=True, autoincrement=True),
        sa.Column("participant_id", sa.String(64), nullable=False),
        sa.Column("order_id", sa.String(32), nullable=False, unique=True),
        sa.Column("client_order_id", sa.String(64), nullable=False),
        sa.Column("interval_start_s", sa.BigInteger(), nullable=False),
        sa.Column("side", sa.SmallInteger(), nullable=False),
        sa.Column("node_id", sa.String(64), nullable=False),
        sa.Column("energy_wh", sa.BigInteger(), nullable=False),
        sa.Column("accepted_wh", sa.BigInteger(), nullable=False),
        sa.Column("price_micro_per_kwh", sa.BigInteger(), nullable=False),
        sa.Column("created_at_s", sa.Float(), nullable=False),
    )
    op.create_index("ix_ob_fills_participant", "ob_fills", ["participant_id", "fill_seq"])


def downgrade() -> None:
    op.drop_index("ix_ob_fills_participant", "ob_fills")
    op.drop_table("ob_fills")
    op.drop_table("ob_intervals")
    op.drop_index("ix_ob_orders_interval", "ob_orders")
    op.drop_table("ob_orders")
    op.drop_table("ob_book_state")
    op.drop_index("ix_ob_meters_participant", "ob_meters")
    op.drop_table("ob_meters")
    op.drop_table("ob_participants")
