"""Fixtures that start real dependencies on free ports and always tear them down."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from services.platform.db import drop_schema, unique_schema_name
from services.platform.nats_server import NatsServer

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A real nats-server with JetStream (file storage, sync always) on a free port."""
    server = NatsServer(store_dir=tmp_path / "nats")
    server.start()
    try:
        yield server
    finally:
        server.cleanup()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'p2pgrid.db'}"


def _postgres_base_url() -> str:
    return os.environ.get("P2PGRID_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A PostgreSQL URL whose search path is a fresh schema, dropped afterwards.

    PostgreSQL comes from P2PGRID_TEST_POSTGRES_URL. Without a reachable server
    the test is skipped on a developer machine and fails when CI is set.
    """
    base = _postgres_base_url()
    try:
        probe = create_engine(base, poolclass=NullPool)
        with probe.connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:  # the reason is reported either way
        message = f"PostgreSQL at {base} is not reachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    schema = unique_schema_name("test")
    with probe.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    separator = "&" if "?" in base else "?"
    try:
        yield f"{base}{separator}options={quote(f'-csearch_path={schema}')}"
    finally:
        drop_schema(base, schema)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Each test using this runs on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return str(request.getfixturevalue("sqlite_url"))
    return str(request.getfixturevalue("postgres_url"))
