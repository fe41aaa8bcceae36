"""Line limits set by operators: stored with SQLAlchemy Core, kept in memory as the domain's LimitSchedule.

The database is the source of truth: a limit is in force only once its row is
committed, and the schedule is rebuilt from the rows at start, so limits
survive a restart. Rows are appended, never updated: a later row wins over an
earlier one for the intervals both cover (see `domain/limits.py`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import (
    BigInteger,
    Column,
    Engine,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    select,
)

from services.domain.intervals import Clock
from services.grid_check.domain.limits import (
    LimitChange,
    LimitRequest,
    LimitSchedule,
    LineLimit,
    effective_limits,
    limits_from_dicts,
    set_limits,
)
from services.platform.db import migrate

log = logging.getLogger(__name__)

VERSION_TABLE = "alembic_version_grid_check"
MIGRATIONS = "services.grid_check.adapters.migrations"

metadata = MetaData()
limit_changes = Table(
    "gc_limit_changes",
    metadata,
    Column("seq", BigInteger().with_variant(Integer(), "sqlite"), primary_key=True, autoincrement=True),
    Column("line_id", String(128), nullable=False),
    Column("start_s", BigInteger(), nullable=False),
    Column("until_s", BigInteger(), nullable=True),
    Column("capacity_w", BigInteger(), nullable=False),
    Column("reason", Text(), nullable=False),
    Column("set_by", String(128), nullable=False),
    Column("set_at_s", Float(), nullable=False),
)


def migrate_grid_check_tables(engine: Engine) -> None:
    """Create or upgrade grid_check's own tables."""
    migrate(engine, MIGRATIONS, VERSION_TABLE)


class LimitStore:
    """The `gc_limit_changes` table: append limit changes, read them back in the order they were set."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def rows(self) -> list[dict[str, Any]]:
        with self.engine.connect() as conn:
            result = conn.execute(select(limit_changes).order_by(limit_changes.c.seq))
            return [dict(row._mapping) for row in result]

    def append(self, changes: Sequence[LimitChange], *, set_at_s: float) -> None:
        """Store all of `changes` in one transaction, or none of them."""
        with self.engine.begin() as conn:
            conn.execute(
                limit_changes.insert(),
                [
                    {
                        "line_id": change.line_id,
                        "start_s": change.start_s,
                        "until_s": change.until_s,
                        "capacity_w": change.capacity_w,
                        "reason": change.reason,
                        "set_by": change.set_by,
                        "set_at_s": set_at_s,
                    }
                    for change in changes
                ],
            )


def schedule_from_rows(rows: Iterable[Mapping[str, Any]], ratings_w: Mapping[str, int]) -> LimitSchedule:
    """The schedule of stored rows; rows for lines the grid no longer has are skipped with a warning."""
    known: list[Mapping[str, Any]] = []
    for row in rows:
        if row["line_id"] in ratings_w:
            known.append(row)
        else:
            log.warning(
                "stored limit for line %s ignored: the grid has no such line (seq %s)",
                row["line_id"],
                row["seq"],
            )
    return limits_from_dicts(known, ratings_w=ratings_w)


class LimitBook:
    """The limits in force, per interval: the domain's schedule in memory, every change stored first.

    Changes are serialised by a lock, so two operators setting limits at once
    get a consistent order in memory and in the table.
    """

    def __init__(
        self,
        store: LimitStore,
        *,
        ratings_w: Mapping[str, int],
        clock: Clock,
        interval_s: int,
        gate_closure_s: int,
    ) -> None:
        self.store = store
        self.ratings_w = dict(ratings_w)
        self.clock = clock
        self.interval_s = interval_s
        self.gate_closure_s = gate_closure_s
        # Replaced as a whole (never mutated), so readers on other threads see one schedule or the next.
        self.schedule = LimitSchedule()
        self._lock = asyncio.Lock()

    def load(self) -> None:
        """Rebuild the schedule from the stored rows (at start)."""
        self.schedule = schedule_from_rows(self.store.rows(), self.ratings_w)

    def limits_for(self, interval_start_s: int) -> dict[str, LineLimit]:
        """The limit in force on every line, in the grid's line order."""
        return effective_limits(self.ratings_w, self.schedule, interval_start_s)

    async def set(
        self,
        *,
        start_s: int,
        until_s: int | None,
        requests: Sequence[LimitRequest],
        set_by: str,
    ) -> dict[str, LineLimit]:
        """Validate and store the operator's limits; returns the limits now in force for `start_s`.

        Raises InvalidArgument or FailedPrecondition (gate closed) and then stores nothing.
        """
        async with self._lock:
            schedule, changes = set_limits(
                self.schedule,
                ratings_w=self.ratings_w,
                start_s=start_s,
                until_s=until_s,
                requests=requests,
                set_by=set_by,
                now_s=self.clock.now_s(),
                interval_s=self.interval_s,
                gate_closure_s=self.gate_closure_s,
            )
            await asyncio.to_thread(self.store.append, changes, set_at_s=time.time())
            self.schedule = schedule
        log.info(
            "limits set",
            extra={"start_s": start_s, "until_s": until_s, "lines": len(changes), "set_by": set_by},
        )
        return self.limits_for(start_s)
