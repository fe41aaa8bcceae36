"""Every dashboard query against a real Prometheus scraping the running stack.

The local stack (services/stack/supervisor.py: nats-server and the five
services on a simulated clock) is started in a temporary folder, and a real
Prometheus (Debian's `prometheus`) on a free port scrapes every service's
/metrics port, taken from the services' ready files, every second. The test
makes a few gRPC calls (one that succeeds, one refused for lack of
credentials) so that the request metrics exist, then evaluates every query
of every dashboard panel and every template variable through Prometheus's
HTTP API, and loads the alert rules into the same server.

What is asserted:
- every query is valid: HTTP 200 and status "success" (Prometheus parses and
  evaluates it against real series);
- every query returns data once every metric it names has samples in the
  running stack ("exported now", read from the services' /metrics), except
  for the alarm panels listed in ALARM_PANELS, which stay empty in a healthy
  market by design;
- every alert rule evaluates without error.

Without market traffic (no bots or meters in this stack), the services
export only part of the catalog, so "returns data" covers only the panels
on those metrics. When this test was written that was 17 of the 59 panel
queries: services serving and service status (p2pgrid_service_up); gRPC
requests, errors, latency p99, p50 and mean, and error ratio; NATS messages
published and the outbox backlog; the order book's gate closures and fills;
grid_check's line loading (most loaded line, lines over their limit, line
loading, ten most loaded lines) and net injection per node. The clearing,
settlement, metering, consumer-lag and verdict panels are checked for
validity only. Run with `-s` to see the panels held to "returns data" and
those whose metrics are not exported yet. Once the stack runs a market
(bots and meters, as `p2pgrid up` does), set EVERY_PANEL_HAS_DATA to True:
then every metric the dashboards use must be exported and every panel
outside ALARM_PANELS must return data.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2 as pb
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2_grpc as pb_grpc
from services.platform.nats_server import free_port
from services.stack.supervisor import Stack, StackConfig

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO / "tests" / "unit" / "deploy"))
from deploy_checks import (  # noqa: E402
    ALERTS,
    DashboardQuery,
    catalog_series,
    dashboard_queries,
    metric_names,
    require_tool,
    substitute,
    variable_queries,
)

# Switch on once the stack used here runs a market (bots and meters).
EVERY_PANEL_HAS_DATA = False
# Panels that show only failures: empty while nothing fails.
ALARM_PANELS = frozenset(
    {
        "Orders rejected",
        "Rejection ratio",
        "Violations by source",
        "Violations by line",
        "Invalid values by reason",
        "Meters with invalid values",
    }
)
SCRAPE_INTERVAL_S = 1
RATE_INTERVAL = "10s"
RANGE = "5m"


def _http_json(url: str, timeout_s: float = 5.0) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


class Prometheus:
    """A Prometheus server on a free port, scraping the given targets; always stopped."""

    def __init__(self, folder: Path, targets: dict[str, int]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_INTERVAL_S}s",
                "evaluation_interval": f"{SCRAPE_INTERVAL_S}s",
            },
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "p2pgrid",
                    "static_configs": [
                        {"targets": [f"127.0.0.1:{port}"], "labels": {"app": name.replace("_", "-")}}
                        for name, port in sorted(targets.items())
                    ],
                }
            ],
        }
        self.config_path = folder / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(config))
        self.log_path = folder / "prometheus.log"
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, binary: str, timeout_s: float = 30.0) -> None:
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [
                    binary,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.folder / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"prometheus exited: {self.log_path.read_text()}")
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return
            except (TimeoutError, urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"prometheus not ready: {self.log_path.read_text()}")

    def query(self, expr: str) -> tuple[int, dict[str, Any]]:
        return _http_json(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Prometheus]]:
    binary = require_tool("prometheus")
    folder = tmp_path_factory.mktemp("live-dashboards")
    stack = Stack(
        StackConfig(
            workdir=folder / "stack",
            sim_start_s=time.time(),
            speedup=60.0,
            grid_path=str(REPO / "deploy" / "grids" / "lv_feeder.yaml"),
        )
    )
    prometheus: Prometheus | None = None
    try:
        stack.start(timeout_s=60)
        _call_some_rpcs(stack.services["grid_check"].grpc_port)
        prometheus = Prometheus(
            folder, {name: service.metrics_port for name, service in stack.services.items()}
        )
        prometheus.start(binary)
        _wait_for_scrapes(prometheus, len(stack.services))
        yield stack, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        stack.stop()


def _call_some_rpcs(grpc_port: int) -> None:
    """One call that succeeds and one refused for lack of credentials: both are counted."""
    with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
        stub = pb_grpc.GridCheckStub(channel)
        stub.GetNetwork(pb.GetNetworkRequest(), timeout=10)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SetLimits(pb.SetLimitsRequest(), timeout=10)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


def _wait_for_scrapes(prometheus: Prometheus, targets: int, timeout_s: float = 30.0) -> None:
    """Until every target is up and has been scraped often enough for rate() over RATE_INTERVAL."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status, body = prometheus.query(f"count_over_time(up[{RATE_INTERVAL}]) >= 4 and up == 1")
        if status == 200 and len(body["data"]["result"]) == targets:
            return
        time.sleep(0.5)
    raise TimeoutError(f"Prometheus did not scrape all {targets} services: {prometheus.log_path.read_text()}")


def _exported_now(stack: Stack) -> set[str]:
    """Series names with at least one sample on some service's /metrics right now."""
    names: set[str] = set()
    for service in stack.services.values():
        with urllib.request.urlopen(
            f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5
        ) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            names.update(sample.name for sample in family.samples)
    return names


def _evaluate(prometheus: Prometheus, query: DashboardQuery) -> tuple[bool, int, str]:
    """(valid, number of result series, error) of one panel query."""
    status, body = prometheus.query(substitute(query.expr, rate_interval=RATE_INTERVAL, range_=RANGE))
    if status != 200 or body.get("status") != "success":
        return False, 0, f"HTTP {status}: {body.get('error', body)}"
    return True, len(body["data"]["result"]), ""


@pytest.mark.slow
def test_every_panel_query_is_valid_and_returns_data_where_its_metrics_are_exported(
    running: tuple[Stack, Prometheus],
) -> None:
    stack, prometheus = running
    exported = _exported_now(stack)
    queries = dashboard_queries()
    invalid, empty, held, not_yet = [], [], [], []
    for query in queries:
        valid, series, error = _evaluate(prometheus, query)
        if not valid:
            invalid.append(f"{query.where}: {error}")
            continue
        if query.panel in ALARM_PANELS:
            continue
        if metric_names(substitute(query.expr)) <= exported:
            held.append(query.where)
            if series == 0:
                empty.append(f"{query.where}: no data ({query.expr})")
        else:
            not_yet.append(query.where)
    print(f"held to 'returns data' ({len(held)}):", *held, sep="\n  ")
    print(f"metrics not exported yet ({len(not_yet)}):", *not_yet, sep="\n  ")
    assert not invalid, "invalid queries:\n" + "\n".join(invalid)
    assert not empty, "queries without data although their metrics are exported:\n" + "\n".join(empty)
    # The stack exports at least the health and gRPC metrics, so the check above is never vacuous.
    assert any("Service status" in where for where in held)
    assert any("Latency p99" in where for where in held)
    if EVERY_PANEL_HAS_DATA:
        assert not not_yet, "panels whose metrics the running market does not export:\n" + "\n".join(not_yet)


@pytest.mark.slow
def test_every_template_variable_query_is_valid(running: tuple[Stack, Prometheus]) -> None:
    stack, prometheus = running
    exported = _exported_now(stack)
    for query in variable_queries():
        metric, label = query.expr.removeprefix("label_values(").removesuffix(")").replace(" ", "").split(",")
        assert metric in catalog_series()
        status, body = _http_json(
            f"{prometheus.url}/api/v1/label/{label}/values?" + urllib.parse.urlencode({"match[]": metric})
        )
        assert status == 200 and body["status"] == "success", f"{query.where}: {body}"
        if metric in exported:
            assert body["data"], f"{query.where}: no values although {metric} is exported"


@pytest.mark.slow
def test_a_broken_query_is_reported_invalid(running: tuple[Stack, Prometheus]) -> None:
    _, prometheus = running
    valid, _, error = _evaluate(
        prometheus, DashboardQuery("probe", "probe", "A", "sum by (service (p2pgrid_service_up)")
    )
    assert not valid and "HTTP 400" in error


@pytest.mark.slow
def test_every_alert_rule_evaluates_without_error(running: tuple[Stack, Prometheus]) -> None:
    _, prometheus = running
    deadline = time.monotonic() + 10
    while True:
        status, body = _http_json(f"{prometheus.url}/api/v1/rules")
        assert status == 200
        rules = [rule for group in body["data"]["groups"] for rule in group["rules"]]
        evaluated = bool(rules) and all(rule.get("lastEvaluation", "").startswith("2") for rule in rules)
        if evaluated or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    expected = yaml.safe_load(ALERTS.read_text())
    assert len(rules) == sum(len(group["rules"]) for group in expected["groups"])
    broken = [f"{rule['name']}: {rule.get('lastError')}" for rule in rules if rule["health"] != "ok"]
    assert not broken, "\n".join(broken)
    # With every service serving, the not-serving alert does not fire.
    firing = {alert["labels"]["alertname"] for rule in rules for alert in rule.get("alerts", [])}
    assert "P2pgridServiceNotServing" not in firing
