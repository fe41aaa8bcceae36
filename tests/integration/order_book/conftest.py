"""Fixtures of the order book's integration tests: a real nats-server, SQLite or PostgreSQL, and order book processes."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from order_book_harness import OrderBookProcess
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from services.platform.db import drop_schema, unique_schema_name
from services.platform.nats_server import NatsServer

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
REPO_ROOT = Path(__file__).resolve().parents[3]
# The example bots live beside `services/`, at the repository root.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def postgres_schema_url(prefix: str) -> tuple[str, str, str]:
    """(url with a fresh schema as search path, base url, schema); skips without PostgreSQL unless CI is set."""
    base = os.environ.get("P2PGRID_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    try:
        probe = create_engine(base, poolclass=NullPool)
        with probe.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        message = f"PostgreSQL at {base} is not reachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    schema = unique_schema_name(prefix)
    with probe.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in base else "?"
    return f"{base}{separator}options={quote(f'-csearch_path={schema}')}", base, schema


@pytest.fixture(scope="module", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def module_database_url(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """A fresh database per module and backend: SQLite in a temporary folder, or a PostgreSQL schema."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path_factory.mktemp('db') / 'order_book.db'}"
        return
    url, base, schema = postgres_schema_url("ob")
    try:
        yield url
    finally:
        drop_schema(base, schema)


@pytest.fixture(scope="module")
def module_nats(tmp_path_factory: pytest.TempPathFactory, module_database_url: str) -> Iterator[NatsServer]:
    """A nats-server per module and database backend: each backend's run starts from empty streams."""
    server = NatsServer(store_dir=tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


OrderBookFactory = Callable[..., OrderBookProcess]


@pytest.fixture
def order_book_factory(tmp_path: Path, nats_server: NatsServer) -> Iterator[OrderBookFactory]:
    """Start order book processes for one test (function-scoped nats-server); all are stopped afterwards."""
    started: list[OrderBookProcess] = []

    def start(database_url: str, **kwargs: Any) -> OrderBookProcess:
        book = OrderBookProcess(nats_server.url, database_url, tmp_path / f"book{len(started)}", **kwargs)
        started.append(book)
        return book.start()

    try:
        yield start
    finally:
        for book in started:
            book.kill()
