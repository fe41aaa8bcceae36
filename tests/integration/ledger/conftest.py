"""Ledger stores on real SQLite files and real PostgreSQL schemas, with a clock past every test interval."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from nacl.signing import SigningKey

from services.domain.intervals import SimulatedClock
from services.ledger.adapters.sql import LedgerStore, migrate_ledger
from services.platform.db import make_engine

# 2031-01-01: every interval the tests settle lies before it, so the metering deadline has passed.
LATE_CLOCK = SimulatedClock(start_s=1_924_992_000.0)
LEDGER_KEY = SigningKey(bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"))


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
