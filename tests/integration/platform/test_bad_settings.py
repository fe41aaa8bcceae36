"""Bad settings end a service with one line naming the setting and exit code 2, never a traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from services.platform.nats_server import free_port

SERVICES = ("meter_ingest", "order_book", "matcher", "grid_check", "ledger")
WITH_DATABASE = {"meter_ingest", "order_book", "grid_check", "ledger"}


def database_args(service: str, folder: Path | None = None) -> list[str]:
    if service not in WITH_DATABASE:
        return []
    # A file database, so that services which keep files beside it (the ledger's key) find a folder.
    return ["--database-url", f"sqlite:///{folder / service}.db" if folder else "sqlite:///:memory:"]


def run(service: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("P2PGRID_")}
    return subprocess.run(
        [sys.executable, "-m", f"services.{service}", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *needles: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("service", SERVICES)
def test_an_unknown_flag_is_a_one_line_error_with_exit_code_2(service: str) -> None:
    assert_one_line_error(run(service, "--no-such-flag", "1"), "--no-such-flag")


@pytest.mark.parametrize("service", SERVICES)
def test_a_malformed_nats_url_names_the_setting(service: str) -> None:
    result = run(service, "--nats-url", "nats//127.0.0.1", *database_args(service))
    assert_one_line_error(result, "--nats-url", "nats//127.0.0.1")


@pytest.mark.parametrize("service", ["order_book", "ledger", "meter_ingest", "grid_check"])
def test_a_malformed_database_url_names_the_setting(service: str) -> None:
    result = run(service, "--nats-url", "nats://127.0.0.1:1", "--database-url", "mysql://db/x")
    assert_one_line_error(result, "--database-url", "mysql")


def test_a_malformed_number_from_the_environment_names_the_variable() -> None:
    result = run(
        "matcher", env={"P2PGRID_MATCHER_NATS_URL": "nats://127.0.0.1:1", "P2PGRID_MATCHER_GRPC_PORT": "http"}
    )
    assert_one_line_error(result, "--grpc-port", "P2PGRID_MATCHER_GRPC_PORT", "'http'")


def test_a_missing_required_setting_names_the_flag_and_the_variable() -> None:
    assert_one_line_error(
        run("ledger", "--nats-url", "nats://127.0.0.1:1"), "--database-url", "P2PGRID_LEDGER_DATABASE_URL"
    )


@pytest.mark.parametrize("service", SERVICES)
def test_an_unreachable_nats_at_start_names_the_setting(service: str, tmp_path: Path) -> None:
    port = free_port()
    result = run(
        service,
        "--nats-url",
        f"nats://127.0.0.1:{port}",
        "--nats-connect-timeout-s",
        "0.5",
        *database_args(service, tmp_path),
    )
    assert_one_line_error(result, "--nats-url", f"127.0.0.1:{port}")
