"""Meter state in the database, written in the same transaction as the interval energy events it led to.

Why the database and not a replay of the readings stream: a meter's state is
small (the last accepted counters and the few counter points around the next
interval boundaries, thanks to thinned segments), while a replay would have to
re-read and re-validate every reading since the oldest unpublished interval.
Saving the state with the outbox rows of the intervals it released makes the
pair atomic: after a crash either both are there (the intervals are never
released again) or neither (they are released again, from the same points, so
with the same energies and event ids). Between releases the state is saved
every few seconds; readings taken after the last save are simply missing
after a restart, which costs no energy because counters are cumulative: the
next reading covers the time in between.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

from sqlalchemy import Column, Engine, Float, Integer, MetaData, String, Table, Text, select
from sqlalchemy.dialects import postgresql, sqlite

from services.platform.db import migrate
from services.platform.outbox import add_to_outbox

VERSION_TABLE = "alembic_version_meter_ingest"
MIGRATIONS = "services.meter_ingest.adapters.migrations"

metadata = MetaData()
meter_state = Table(
    "mi_meter_state",
    metadata,
    Column("meter_id", String(128), primary_key=True),
    Column("state_json", Text(), nullable=False),
    Column("interval_s", Integer(), nullable=False),
    Column("saved_at_s", Float(), nullable=False),
)

# (subject, payload, event_id) of an event for the outbox.
OutboxEvent = tuple[str, bytes, str]


def migrate_meter_ingest_tables(engine: Engine) -> None:
    """Create or upgrade meter_ingest's own tables."""
    migrate(engine, MIGRATIONS, VERSION_TABLE)


class MeterStateStore:
    """Reads every meter's saved state at start; saves states and outbox events in one transaction."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def load(self, interval_s: int) -> dict[str, dict[str, Any]]:
        """Saved state per meter id, only those computed with this interval length."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(meter_state.c.meter_id, meter_state.c.state_json).where(
                    meter_state.c.interval_s == interval_s
                )
            ).all()
        return {str(row.meter_id): dict(json.loads(row.state_json)) for row in rows}

    def save(
        self, states: Mapping[str, Mapping[str, Any]], interval_s: int, events: Sequence[OutboxEvent] = ()
    ) -> None:
        """Upsert `states` and add `events` to the outbox, all in one transaction."""
        if not states and not events:
            return
        now_s = time.time()
        rows = [
            {
                "meter_id": meter_id,
                "state_json": json.dumps(state, separators=(",", ":")),
                "interval_s": interval_s,
                "saved_at_s": now_s,
            }
            for meter_id, state in states.items()
        ]
        with self.engine.begin() as conn:
            if rows:
                if conn.dialect.name == "postgresql":
                    insert: Any = postgresql.insert(meter_state)
                else:
                    insert = sqlite.insert(meter_state)
                conn.execute(
                    insert.on_conflict_do_update(
                        index_elements=[meter_state.c.meter_id],
                        set_={
                            "state_json": insert.excluded.state_json,
                            "interval_s": insert.excluded.interval_s,
                            "saved_at_s": insert.excluded.saved_at_s,
                        },
                    ),
                    rows,
                )
            for subject, payload, event_id in events:
                add_to_outbox(conn, subject, payload, event_id)
