"""The dev overlay's PostgreSQL init script, run against a real PostgreSQL: one role and database per service URL."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

REPO = Path(__file__).resolve().parents[3]
SCRIPT = REPO / "deploy" / "k8s" / "overlays" / "dev" / "postgres-init.sh"
SERVICES_WITH_DATABASE = ("meter_ingest", "order_book", "grid_check", "ledger")
DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


@pytest.fixture
def admin_url() -> Iterator[str]:
    url = os.environ.get("P2PGRID_TEST_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    try:
        with create_engine(url, poolclass=NullPool).connect() as conn:
            conn.execute(text("select 1"))
    except Exception as exc:
        message = f"PostgreSQL at {url} is not reachable: {exc}"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if shutil.which("psql") is None:
        message = "psql not found (Debian package postgresql-client)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    yield url


@pytest.mark.postgres
def test_the_init_script_creates_each_services_role_and_database_from_its_url(admin_url: str) -> None:
    admin = make_url(admin_url)
    run = secrets.token_hex(4)
    names = {service: f"p2pgrid_init_{run}_{service}" for service in SERVICES_WITH_DATABASE}
    passwords = {service: secrets.token_hex(12) for service in SERVICES_WITH_DATABASE}
    env = {
        **os.environ,
        "PGHOST": admin.host or "127.0.0.1",
        "PGPORT": str(admin.port or 5432),
        "POSTGRES_USER": admin.username or "postgres",
    }
    if admin.password:
        env["PGPASSWORD"] = admin.password
    for service in SERVICES_WITH_DATABASE:
        env[f"DATABASE_URL_{service.upper()}"] = (
            f"postgresql+psycopg://{names[service]}:{passwords[service]}@postgres:5432/{names[service]}"
        )
    engine = create_engine(admin_url, poolclass=NullPool, isolation_level="AUTOCOMMIT")
    try:
        result = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        with engine.connect() as conn:
            for service, name in names.items():
                owner = conn.execute(
                    text("select pg_get_userbyid(datdba) from pg_database where datname = :name"),
                    {"name": name},
                ).scalar_one()
                assert owner == name, service
                can_login = conn.execute(
                    text("select rolcanlogin from pg_roles where rolname = :name"), {"name": name}
                ).scalar_one()
                assert can_login is True
                public_connect = conn.execute(
                    text("select has_database_privilege('public', :name, 'CONNECT')"), {"name": name}
                ).scalar_one()
                assert public_connect is False, f"{name} is open to every role"
        # Each service connects as its own role to its own database.
        for service, name in names.items():
            url = admin.set(username=name, password=passwords[service], database=name)
            with create_engine(url, poolclass=NullPool).connect() as conn:
                assert conn.execute(text("select current_user")).scalar_one() == name
                conn.execute(text("create table probe (id integer)"))
    finally:
        with engine.connect() as conn:
            for name in names.values():
                conn.execute(text(f'drop database if exists "{name}"'))
                conn.execute(text(f'drop role if exists "{name}"'))
        engine.dispose()


@pytest.mark.postgres
def test_the_init_script_refuses_a_url_it_cannot_read(admin_url: str) -> None:
    env = {
        **os.environ,
        **{f"DATABASE_URL_{service.upper()}": "not a url" for service in SERVICES_WITH_DATABASE},
    }
    result = subprocess.run(["sh", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    assert "database_url for METER_INGEST" in result.stderr
