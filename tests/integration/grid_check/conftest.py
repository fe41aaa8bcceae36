"""Fixtures for grid_check's integration tests: pandapower as the DC power-flow oracle, and the service as a process."""

from __future__ import annotations

import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from prometheus_client.parser import text_string_to_metric_families

from services.platform.nats_server import NatsServer


@pytest.fixture(scope="session")
def pp() -> ModuleType:
    """pandapower, imported once; missing it skips locally and fails when CI is set."""
    # pandapower logs a warning on import when numba is absent; the oracle does not need numba.
    logging.getLogger("pandapower").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            pandapower = importlib.import_module("pandapower")
            importlib.import_module("pandapower.networks")
        except ImportError as exc:
            message = f"pandapower is needed as the DC power-flow oracle: {exc}"
            if os.environ.get("CI"):
                pytest.fail(message)
            pytest.skip(message)
    return pandapower


# --------------------------------------------------------------------------------------------
# The grid_check service as a real process, on a small grid written for these tests.
# --------------------------------------------------------------------------------------------

# n0 (slack) --l1 40 kW-- n1 --l2 39.999 kW-- n2
#                          \--l3 20 kW------- n3
# 10,000 Wh over a 900 s interval are 40,000 W: exactly l1's limit and 1 W over l2's.
SERVICE_GRID = """\
interval_minutes: 15
price_tick_micro_per_kwh: 100
slack: n0
nodes: [{id: n0}, {id: n1}, {id: n2}, {id: n3}]
lines:
  - {id: l1, from: n0, to: n1, capacity_w: 40000}
  - {id: l2, from: n1, to: n2, capacity_w: 39999}
  - {id: l3, from: n1, to: n3, capacity_w: 20000}
"""
SERVICE_METERS = "meter_id,node_id\nm-n2,n2\nm-n3,n3\n"
ENV_PREFIX = "P2PGRID_GRID_CHECK_"


@dataclass
class GridCheckProcess:
    """One running `python -m services.grid_check` and its ports."""

    process: subprocess.Popen[bytes]
    grpc_port: int
    metrics_port: int
    log_path: Path

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def metrics_text(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def sample(self, name: str, **labels: str) -> float | None:
        """The value of one sample scraped from /metrics now, or None when it is not exported."""
        for family in text_string_to_metric_families(self.metrics_text()):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return float(sample.value)
        return None

    def stop(self, timeout_s: float = 10.0) -> int:
        """SIGTERM, and the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@pytest.fixture
def service_grid(tmp_path: Path) -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(SERVICE_GRID)
    return path


@pytest.fixture
def service_meters(tmp_path: Path) -> Path:
    path = tmp_path / "meters.csv"
    path.write_text(SERVICE_METERS)
    return path


@pytest.fixture
def start_grid_check(
    nats_server: NatsServer, tmp_path: Path, service_grid: Path, service_meters: Path
) -> Iterator[Callable[..., GridCheckProcess]]:
    """Start grid_check processes on the test grid and a real nats-server; all are stopped afterwards."""
    started: list[GridCheckProcess] = []

    def start(database_url: str = "", **settings: str) -> GridCheckProcess:
        run = len(started)
        ready = tmp_path / f"grid_check.{run}.ready.json"
        log_path = tmp_path / f"grid_check.{run}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
        values = {
            "nats_url": nats_server.url,
            "database_url": database_url or f"sqlite:///{tmp_path / 'grid_check.db'}",
            "grid_path": str(service_grid),
            "meters_path": str(service_meters),
            "log_format": "text",
            "ready_file": str(ready),
            **settings,
        }
        env.update({f"{ENV_PREFIX}{key.upper()}": value for key, value in values.items()})
        with open(log_path, "wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "services.grid_check"], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 30.0
        while not ready.exists():
            if process.poll() is not None:
                raise AssertionError(
                    f"grid_check exited with {process.returncode} before serving:\n{log_path.read_text()}"
                )
            if time.monotonic() > deadline:
                process.kill()
                raise AssertionError(f"grid_check did not serve within 30 s:\n{log_path.read_text()}")
            time.sleep(0.05)
        ports = json.loads(ready.read_text())
        service = GridCheckProcess(process, int(ports["grpc_port"]), int(ports["metrics_port"]), log_path)
        started.append(service)
        return service

    try:
        yield start
    finally:
        for service in started:
            if service.process.poll() is None:
                service.process.kill()
                service.process.wait()
