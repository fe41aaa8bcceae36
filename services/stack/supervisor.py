"""Start nats-server and the five services as supervised processes that share one simulated clock."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.platform.nats_server import NatsServer

SERVICES: tuple[str, ...] = ("grid_check", "matcher", "order_book", "meter_ingest", "ledger")
WITH_DATABASE = frozenset({"grid_check", "order_book", "meter_ingest", "ledger"})


@dataclass
class ServiceProcess:
    name: str
    process: subprocess.Popen[bytes]
    ready_file: Path
    log_file: Path
    grpc_port: int = 0
    metrics_port: int = 0
    restarts: int = 0


@dataclass
class StackConfig:
    workdir: Path
    sim_start_s: float
    speedup: float
    grid_path: str = ""
    # The meters file (services/meter_ingest/README.md): meter_ingest polls or accepts them, grid_check maps them.
    meters_path: str = ""
    extra_env: dict[str, dict[str, str]] = field(default_factory=dict)


@dataclass
class MeterGateways:
    """The simulated Modbus gateways of `p2pgrid meters simulate`, one process serving them all."""

    process: subprocess.Popen[bytes]
    log_file: Path
    map_id: str
    ports: list[int]
    units_per_gateway: int

    def address(self, number: int) -> tuple[int, int]:
        """(port, unit id) of meter `number` (0-based): gateways fill up one after the other."""
        return self.ports[number // self.units_per_gateway], number % self.units_per_gateway + 1


# Modbus unit ids run 1..247; a gateway here serves at most this many meters.
UNITS_PER_GATEWAY = 200


class Stack:
    """nats-server plus one process per service; `start()` returns once all serve."""

    def __init__(self, config: StackConfig) -> None:
        self.config = config
        self.nats = NatsServer(store_dir=config.workdir / "nats")
        self.services: dict[str, ServiceProcess] = {}
        self.meters: MeterGateways | None = None
        self.anchor_wall_s = time.time()

    def start_meters(self, count: int, map_id: str) -> MeterGateways:
        """Serve `count` simulated household meters on the stack's clock; returns where each one answers."""
        from services.meter_ingest.simulator import spawn_gateways

        gateways = max(1, -(-count // UNITS_PER_GATEWAY))
        per_gateway = -(-count // gateways)
        logs = self.config.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        log_file = logs / "meters.log"
        with open(log_file, "ab") as log:
            process, ports = spawn_gateways(
                map_id,
                per_gateway,
                gateways,
                speedup=self.config.speedup,
                start_s=self.config.sim_start_s,
                anchor_wall_s=self.anchor_wall_s,
                first_unit=1,
                log=log,
                detached=True,
            )
        self.meters = MeterGateways(process, log_file, map_id, ports, per_gateway)
        return self.meters

    def database_url(self, service: str) -> str:
        return f"sqlite:///{self.config.workdir / 'db' / service}.db"

    def _env(self, name: str) -> dict[str, str]:
        prefix = f"P2PGRID_{name.upper()}_"
        env = {k: v for k, v in os.environ.items() if not k.startswith("P2PGRID_")}
        env.update(
            {
                f"{prefix}NATS_URL": self.nats.url,
                f"{prefix}CLOCK": "sim",
                f"{prefix}SIM_START_S": repr(self.config.sim_start_s),
                f"{prefix}SIM_SPEEDUP": repr(self.config.speedup),
                f"{prefix}SIM_ANCHOR_WALL_S": repr(self.anchor_wall_s),
                f"{prefix}LOG_FORMAT": "json",
            }
        )
        if name in WITH_DATABASE:
            env[f"{prefix}DATABASE_URL"] = self.database_url(name)
        if self.config.grid_path and name in ("grid_check", "matcher"):
            env[f"{prefix}GRID_PATH"] = self.config.grid_path
        if self.config.meters_path and name in ("grid_check", "meter_ingest"):
            env[f"{prefix}METERS_PATH"] = self.config.meters_path
        env.update(self.config.extra_env.get(name, {}))
        return env

    def _spawn(self, name: str) -> ServiceProcess:
        logs = self.config.workdir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        ready = self.config.workdir / "run" / f"{name}.json"
        ready.parent.mkdir(parents=True, exist_ok=True)
        ready.unlink(missing_ok=True)
        log_file = logs / f"{name}.log"
        with open(log_file, "ab") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", f"services.{name}", "--ready-file", str(ready)],
                env=self._env(name),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return ServiceProcess(name, process, ready, log_file)

    def start(self, timeout_s: float = 60.0) -> None:
        self.config.workdir.mkdir(parents=True, exist_ok=True)
        self.nats.start()
        for name in SERVICES:
            self.services[name] = self._spawn(name)
        deadline = time.monotonic() + timeout_s
        for service in self.services.values():
            self._wait_ready(service, deadline)

    def _wait_ready(self, service: ServiceProcess, deadline: float) -> None:
        while time.monotonic() < deadline:
            if service.ready_file.exists():
                ports = json.loads(service.ready_file.read_text())
                service.grpc_port, service.metrics_port = ports["grpc_port"], ports["metrics_port"]
                return
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"{service.name} exited with {service.process.returncode} at start; see {service.log_file}:\n"
                    + tail(service.log_file)
                )
            time.sleep(0.05)
        raise TimeoutError(f"{service.name} did not start serving; see {service.log_file}")

    def check(self) -> list[str]:
        """Restart any service that died; returns what happened, for the progress view."""
        events = []
        for name, service in list(self.services.items()):
            code = service.process.poll()
            if code is not None:
                events.append(f"{name} exited with {code}; restarting (see {service.log_file})")
                restarted = self._spawn(name)
                restarted.restarts = service.restarts + 1
                self.services[name] = restarted
                self._wait_ready(restarted, time.monotonic() + 60)
        if self.meters is not None and self.meters.process.poll() is not None:
            events.append(
                f"the meter simulator exited with {self.meters.process.returncode} (see {self.meters.log_file})"
            )
            self.meters = None
        return events

    def stop(self, grace_s: float = 10.0) -> dict[str, int]:
        """SIGTERM every service, wait, then stop the meters and NATS; returns each service's exit code."""
        for service in self.services.values():
            if service.process.poll() is None:
                service.process.send_signal(signal.SIGTERM)
        codes = {}
        deadline = time.monotonic() + grace_s
        for name, service in self.services.items():
            try:
                codes[name] = service.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                service.process.kill()
                codes[name] = service.process.wait()
        if self.meters is not None:
            if self.meters.process.poll() is None:
                self.meters.process.send_signal(signal.SIGTERM)
            try:
                self.meters.process.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self.meters.process.kill()
                self.meters.process.wait()
        self.nats.stop()
        return codes


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
