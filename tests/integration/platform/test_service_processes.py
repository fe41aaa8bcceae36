"""Every service runs as a real process: health SERVING, /metrics, and a clean exit on SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from services.platform.nats_server import NatsServer

SERVICES = ("meter_ingest", "order_book", "matcher", "grid_check", "ledger")
WITH_DATABASE = {"meter_ingest", "order_book", "grid_check", "ledger"}
DOMAIN_SERVICE = {
    "meter_ingest": "p2pgrid.meteringest.v1.MeterIngest",
    "order_book": "p2pgrid.orderbook.v1.OrderBook",
    "matcher": "p2pgrid.matcher.v1.Matcher",
    "grid_check": "p2pgrid.gridcheck.v1.GridCheck",
    "ledger": "p2pgrid.ledger.v1.Ledger",
}


def start_service(
    name: str, nats_url: str, workdir: Path, extra: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    ready = workdir / f"{name}.ready.json"
    env = {**os.environ, f"P2PGRID_{name.upper()}_NATS_URL": nats_url}
    if name in WITH_DATABASE:
        env[f"P2PGRID_{name.upper()}_DATABASE_URL"] = f"sqlite:///{workdir / name}.db"
    env.update(extra or {})
    process = subprocess.Popen(
        [sys.executable, "-m", f"services.{name}", "--ready-file", str(ready), "--log-format", "text"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    return process, ready


def wait_ready(process: subprocess.Popen[bytes], ready: Path, timeout_s: float = 30.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready.exists():
            return dict(json.loads(ready.read_text()))
        if process.poll() is not None:
            output = process.stdout.read().decode() if process.stdout else ""
            raise AssertionError(f"service exited with {process.returncode} before serving:\n{output}")
        time.sleep(0.05)
    raise AssertionError(f"no ready file at {ready} after {timeout_s} s")


def health_status(port: int, service: str = "") -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return int(response.status)


def reflected_services(port: int) -> set[str]:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=5))
        return {service.name for service in response.list_services_response.service}


def test_all_five_services_serve_health_and_metrics_and_exit_zero_on_sigterm(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    started = {name: start_service(name, nats_server.url, tmp_path) for name in SERVICES}
    try:
        ports = {name: wait_ready(*started[name]) for name in SERVICES}
        for name in SERVICES:
            assert health_status(ports[name]["grpc_port"]) == health_pb2.HealthCheckResponse.SERVING, name
            reflected = reflected_services(ports[name]["grpc_port"])
            assert {
                "grpc.health.v1.Health",
                "grpc.reflection.v1alpha.ServerReflection",
                DOMAIN_SERVICE[name],
            } <= reflected, name
            body = urllib.request.urlopen(
                f"http://127.0.0.1:{ports[name]['metrics_port']}/metrics", timeout=5
            ).read()
            assert f'p2pgrid_service_up{{service="{name}"}} 1.0'.encode() in body, name
        for name in SERVICES:
            started[name][0].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5.0
        for name in SERVICES:
            process = started[name][0]
            remaining = max(0.0, deadline - time.monotonic())
            try:
                code = process.wait(timeout=remaining)
            except subprocess.TimeoutExpired:
                pytest.fail(f"{name} did not exit within 5 s of SIGTERM")
            output = process.stdout.read().decode() if process.stdout else ""
            assert code == 0, f"{name} exited with {code}:\n{output}"
    finally:
        for process, _ready in started.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def test_the_health_service_lists_each_registered_service_as_serving(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    process, ready = start_service("matcher", nats_server.url, tmp_path)
    try:
        port = wait_ready(process, ready)["grpc_port"]
        assert health_status(port, "grpc.health.v1.Health") == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as info:
            health_status(port, "no.such.Service")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
