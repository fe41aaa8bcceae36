"""PostgreSQL compresses the ledger's JSON documents with LZ4 instead of pglz.

A settlement revision stores its meter state, about 60 kB for a thousand
participants; pglz spent about 3 ms of server time compressing it, LZ4 about
0.8 ms, and the revision is written inside the settlement's transaction. A
server built without LZ4 keeps pglz. SQLite is unchanged.

Revision ID: 0004
Revises: 0003
"""

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_DOCUMENTS = (
    ("settled_intervals", "meter_json"),
    ("settled_intervals", "rules_json"),
    ("staged_clearings", "clearing_json"),
)


def _set_compression(method: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    for table, column in _DOCUMENTS:
        op.execute(
            f"""
            DO $$ BEGIN
                EXECUTE 'ALTER TABLE {table} ALTER COLUMN {column} SET COMPRESSION {method}';
            EXCEPTION WHEN feature_not_supported THEN NULL;
            END $$
            """
        )


def upgrade() -> None:
    _set_compression("lz4")


def downgrade() -> None:
    _set_compression("pglz")
