"""The limit book on SQLite and PostgreSQL: every change is stored before it counts, and read back in order."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, func, select

from services.domain.errors import FailedPrecondition, InvalidArgument
from services.domain.intervals import SimulatedClock
from services.grid_check.adapters.limit_store import (
    LimitBook,
    LimitStore,
    limit_changes,
    migrate_grid_check_tables,
)
from services.grid_check.domain.limits import LimitRequest
from services.platform.db import make_engine

RATINGS_W = {"l1": 40_000, "l2": 39_999}
NOW_S = 1_800_000_000.0
START_S = 1_800_003_600  # an hour ahead: its gate is open


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    engine = make_engine(database_url)
    migrate_grid_check_tables(engine)
    migrate_grid_check_tables(engine)  # a second start finds the schema current
    try:
        yield engine
    finally:
        engine.dispose()


def book_of(engine: Engine, ratings_w: dict[str, int] = RATINGS_W) -> LimitBook:
    book = LimitBook(
        LimitStore(engine),
        ratings_w=ratings_w,
        clock=SimulatedClock(NOW_S, 1.0, time.time()),
        interval_s=900,
        gate_closure_s=300,
    )
    book.load()
    return book


def rows(engine: Engine) -> int:
    with engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(limit_changes)).scalar_one())


def test_limits_are_stored_and_a_later_change_wins_after_a_reload(engine: Engine) -> None:
    book = book_of(engine)

    async def set_two() -> None:
        await book.set(
            start_s=START_S, until_s=None, requests=[LimitRequest("l1", 30_000, "envelope")], set_by="p-op"
        )
        await book.set(
            start_s=START_S + 900,
            until_s=START_S + 1800,
            requests=[LimitRequest("l1", 0, "maintenance")],
            set_by="p-op",
        )

    asyncio.run(set_two())
    reloaded = book_of(engine)
    for view in (book, reloaded):
        assert view.limits_for(START_S - 900)["l1"].capacity_w == 40_000
        assert view.limits_for(START_S)["l1"].capacity_w == 30_000
        assert view.limits_for(START_S + 900)["l1"].reason == "maintenance"
        assert view.limits_for(START_S + 1800)["l1"].capacity_w == 30_000
    assert rows(engine) == 2


def test_a_refused_change_stores_nothing(engine: Engine) -> None:
    book = book_of(engine)
    with pytest.raises(InvalidArgument):
        asyncio.run(
            book.set(
                start_s=START_S,
                until_s=None,
                requests=[LimitRequest("l1", 1), LimitRequest("l2", -1)],
                set_by="p-op",
            )
        )
    with pytest.raises(FailedPrecondition):
        asyncio.run(
            book.set(start_s=int(NOW_S), until_s=None, requests=[LimitRequest("l1", 1)], set_by="p-op")
        )
    assert rows(engine) == 0
    assert book.schedule.changes == ()


def test_a_stored_limit_for_a_line_the_grid_no_longer_has_is_skipped(engine: Engine) -> None:
    asyncio.run(
        book_of(engine).set(
            start_s=START_S, until_s=None, requests=[LimitRequest("l2", 1_000)], set_by="p-op"
        )
    )
    book = book_of(engine, {"l1": 40_000})
    assert book.schedule.changes == ()
    assert book.limits_for(START_S)["l1"].capacity_w == 40_000
