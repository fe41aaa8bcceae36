"""Database engines and schema migrations for every service, SQLite by default and PostgreSQL in production.

SQLite runs in WAL mode with `synchronous=FULL`, so a committed transaction
survives a power loss (NORMAL may roll back the last ones). Each service keeps
its Alembic migrations in `services/<service>/adapters/migrations/` and its own
version table, so several services may share one database.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.pool import NullPool


class DatabaseUrlError(ValueError):
    """A database URL that cannot be used."""


def parse_database_url(url: str) -> URL:
    """Parse and check a database URL: only SQLite and PostgreSQL (psycopg 3) are supported."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUrlError(
            f"{url!r} is not a database URL (expected sqlite:///PATH or postgresql+psycopg://...)"
        ) from exc
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return parsed
    if backend == "postgresql":
        if parsed.get_driver_name() not in ("psycopg",):
            parsed = parsed.set(drivername="postgresql+psycopg")
        return parsed
    raise DatabaseUrlError(f"{url!r}: unsupported database {backend!r} (use sqlite or postgresql)")


def make_engine(url: str, *, schema: str | None = None, pool: bool = True, **kwargs: Any) -> Engine:
    """An engine for `url`; on PostgreSQL, `schema` (created if missing) becomes the search path."""
    parsed = parse_database_url(url)
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database or ""
        if database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        # Room for the ledger's multi-row INSERTs of a few fixed lengths: the driver keeps 128
        # prepared statements by default, and SQLite prepares a long INSERT slowly.
        engine = create_engine(parsed, connect_args={"timeout": 30, "cached_statements": 512}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=FULL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute("PRAGMA busy_timeout=30000")
            cursor.close()

        # pysqlite's own transaction handling defers BEGIN; take it over so that
        # every SQLAlchemy transaction is a real, immediate SQLite transaction.
        @event.listens_for(engine, "connect")
        def _no_pysqlite_begin(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn: Any) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    connect_args: dict[str, Any] = {}
    if schema is not None:
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", schema):
            raise DatabaseUrlError(f"schema {schema!r} must be a lower-case SQL identifier")
        connect_args["options"] = f"-csearch_path={schema}"
        with create_engine(parsed, poolclass=NullPool).begin() as conn:
            conn.execute(text(f'CREATE SCHEMA IF NOT EXISTS "{schema}"'))
    if not pool:
        kwargs.setdefault("poolclass", NullPool)
    return create_engine(parsed, connect_args=connect_args, **kwargs)


def is_postgresql(engine: Engine) -> bool:
    return engine.dialect.name == "postgresql"


def migrate(engine: Engine, migrations_package: str, version_table: str) -> None:
    """Upgrade the schema of one service to the newest Alembic revision in `migrations_package`."""
    from alembic import command
    from alembic.config import Config

    location = resources.files(migrations_package)
    config = Config()
    config.set_main_option("script_location", str(location))
    config.set_main_option("version_table", version_table)
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        config.attributes["version_table"] = version_table
        command.upgrade(config, "head")


def run_migrations_online() -> None:
    """The body of every service's Alembic `env.py`: migrate the connection handed in by `migrate`."""
    from alembic import context

    config = context.config
    connection = config.attributes.get("connection")
    if connection is None:
        raise RuntimeError("migrations run through services.platform.db.migrate(), which passes a connection")
    context.configure(
        connection=connection,
        target_metadata=None,
        version_table=config.attributes["version_table"],
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def unique_schema_name(prefix: str = "t") -> str:
    """A fresh schema name, so that test runs sharing one PostgreSQL database never meet."""
    return f"{prefix}_{secrets.token_hex(6)}"


def drop_schema(url: str, schema: str) -> None:
    with create_engine(parse_database_url(url), poolclass=NullPool).begin() as conn:
        conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))


@contextmanager
def postgres_schema(url: str, prefix: str = "t") -> Iterator[str]:
    """Create a throw-away schema for the duration of the block."""
    schema = unique_schema_name(prefix)
    try:
        yield schema
    finally:
        drop_schema(url, schema)
