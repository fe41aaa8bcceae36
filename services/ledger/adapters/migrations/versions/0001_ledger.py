"""Ledger tables: accounts, transfers, chain, Merkle nodes, checkpoints, settled intervals; append-only rules.

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

# seq is INTEGER PRIMARY KEY on SQLite, i.e. the rowid: appends go to the end of the table's B-tree.
_SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

APPEND_ONLY = ("transfers", "chain", "merkle_nodes", "checkpoints", "settled_intervals")


def upgrade() -> None:
    op.create_table(
        "accounts",
        sa.Column("account_id", sa.String(128), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("debits_nano", sa.BigInteger(), nullable=False),
        sa.Column("credits_nano", sa.BigInteger(), nullable=False),
    )
    op.create_table(
        "transfers",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=False),
        sa.Column("transfer_id", sa.String(64), nullable=False, unique=True),
        sa.Column("debit_account", sa.String(128), nullable=False),
        sa.Column("credit_account", sa.String(128), nullable=False),
        sa.Column("amount_nano", sa.BigInteger(), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("interval_start_s", sa.BigInteger(), nullable=False),
        sa.Column("linked_group", sa.String(64), nullable=False),
        sa.Column("flags", sa.SmallInteger(), nullable=False),
    )
    # Statements scan by interval; an index per account would multiply the cost of every append.
    op.create_index("ix_transfers_interval", "transfers", ["interval_start_s"])
    op.create_table(
        "chain",
        sa.Column("seq", _SEQ, primary_key=True, autoincrement=False),
        sa.Column("transfer_id", sa.String(64), nullable=False),
        sa.Column("entry_hash", sa.LargeBinary(), nullable=False),
        sa.Column("chained_hash", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "merkle_nodes",
        sa.Column("level", sa.SmallInteger(), primary_key=True),
        sa.Column("node_index", sa.BigInteger(), primary_key=True),
        sa.Column("hash", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "checkpoints",
        sa.Column("tree_size", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("origin", sa.String(100), nullable=False),
        sa.Column("root_hash", sa.LargeBinary(), nullable=False),
        sa.Column("chain_head", sa.LargeBinary(), nullable=False),
        sa.Column("time_ms", sa.BigInteger(), nullable=False),
        sa.Column("previous_hash", sa.LargeBinary(), nullable=False),
        sa.Column("public_key", sa.LargeBinary(), nullable=False),
        sa.Column("signature", sa.LargeBinary(), nullable=False),
        sa.Column("frontier", sa.LargeBinary(), nullable=False),
    )
    op.create_table(
        "settled_intervals",
        sa.Column("market_id", sa.String(100), primary_key=True),
        sa.Column("interval_start_s", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("revision", sa.Integer(), primary_key=True, autoincrement=False),
        sa.Column("interval_s", sa.Integer(), nullable=False),
        sa.Column("clearing_digest", sa.String(64), nullable=False),
        sa.Column("rules_json", sa.Text(), nullable=False),
        sa.Column("meter_json", sa.Text(), nullable=False),
        sa.Column("estimated_count", sa.Integer(), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("transfer_count", sa.Integer(), nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("settled_at_ms", sa.BigInteger(), nullable=False),
    )
    if op.get_bind().dialect.name == "postgresql":
        # Account totals are rewritten after every batch: room on each page lets PostgreSQL
        # update them in place (HOT) without touching the primary key index.
        op.execute("ALTER TABLE accounts SET (fillfactor = 50)")
        op.execute(
            """
            CREATE FUNCTION ledger_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP;
            END
            $$
            """
        )
        for table in APPEND_ONLY:
            op.execute(
                f"CREATE TRIGGER {table}_refuse_change BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION ledger_refuse_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_refuse_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION ledger_refuse_change()"
            )
    else:
        for table in APPEND_ONLY:
            for action in ("UPDATE", "DELETE"):
                op.execute(
                    f"CREATE TRIGGER {table}_refuse_{action.lower()} BEFORE {action} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {action} refused'); END"
                )


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        for table in APPEND_ONLY:
            op.execute(f"DROP TRIGGER IF EXISTS {table}_refuse_change ON {table}")
            op.execute(f"DROP TRIGGER IF EXISTS {table}_refuse_truncate ON {table}")
        op.execute("DROP FUNCTION IF EXISTS ledger_refuse_change()")
    for table in ("settled_intervals", "checkpoints", "merkle_nodes", "chain", "transfers", "accounts"):
        op.drop_table(table)
