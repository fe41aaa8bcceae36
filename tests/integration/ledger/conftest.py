"""Ledger stores on real SQLite files and real PostgreSQL schemas, with a clock past every test interval."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from ledger_testing import LATE_CLOCK, LEDGER_KEY

from services.ledger.adapters.sql import LedgerStore, migrate_ledger
from services.platform.db import make_engine


@pytest.fixture
def make_store() -> Iterator[Callable[[str], LedgerStore]]:
    """Open (and migrate) a ledger store on a URL; engines are disposed after the test."""
    engines = []

    def make(url: str) -> LedgerStore:
        engine = make_engine(url)
        engines.append(engine)
        migrate_ledger(engine)
        return LedgerStore(engine, LEDGER_KEY, clock=LATE_CLOCK)

    yield make
    for engine in engines:
        engine.dispose()


@pytest.fixture
def store(database_url: str, make_store: Callable[[str], LedgerStore]) -> LedgerStore:
    return make_store(database_url)


@pytest.fixture
def sqlite_store(sqlite_url: str, make_store: Callable[[str], LedgerStore]) -> LedgerStore:
    return make_store(sqlite_url)
