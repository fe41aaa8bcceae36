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

The stack is the local market of `p2pgrid up` (services/stack/local_market.py):
simulated Modbus meters polled by meter_ingest, prosumer bots trading through
the order book, clearing, grid verdicts and settlement. The queries run once
TRADED_INTERVALS intervals have cleared and settled, while the market keeps
trading, so every metric the dashboards use is exported and every panel
outside ALARM_PANELS must return data. Run with `-s` to see the panels.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
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
from services.stack.local_market import LocalMarket, MarketOptions
from services.stack.supervisor import Stack

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

# The market runs with bots and meters: every metric the dashboards use is exported.
EVERY_PANEL_HAS_DATA = True
PROSUMERS = 16
SPEEDUP = 240.0
# Intervals traded, cleared and settled before the queries run.
TRADED_INTERVALS = 3
# Panels that show only failures: empty while nothing fails.
ALARM_PANELS = frozenset(
    {
        "Orders rejected",
        "Rejection ratio",
        "Violations by source",
        "Violations by line",
        "Invalid values by reason",
        "Meters with invalid values",
        "Offline meters",
        "Violations",
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


class MarketThread:
    """The local market of `p2pgrid up` (services/stack/local_market.py) on an event loop of its own thread."""

    def __init__(self, options: MarketOptions) -> None:
        self.options = options
        self.market: LocalMarket | None = None
        self.wanted: list[int] = []
        self.error: BaseException | None = None
        self._started = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="local-market", daemon=True)

    def _run(self) -> None:
        asyncio.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        market = LocalMarket(self.options)
        try:
            await market.start()
            self.market = market
            self.wanted = market.next_intervals(TRADED_INTERVALS)
        except BaseException as exc:
            self.error = exc
            self._started.set()
            return
        self._started.set()
        try:
            await self._stop.wait()
        finally:
            await market.close()

    def start(self, timeout_s: float = 120.0) -> LocalMarket:
        self._thread.start()
        if not self._started.wait(timeout_s) or self.market is None:
            raise RuntimeError(f"the local market did not start: {self.error!r}")
        return self.market

    def wait_until_settled(self, timeout_s: float) -> None:
        """Until every traded interval is cleared and settled."""
        assert self.market is not None
        deadline = time.monotonic() + timeout_s
        while not self.market.done(self.wanted):
            if time.monotonic() > deadline:
                progress = self.market.progress
                raise TimeoutError(
                    f"{progress.cleared(self.wanted)} cleared, {progress.settled(self.wanted)} settled "
                    f"of {len(self.wanted)} intervals"
                )
            time.sleep(0.5)

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=60)


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Stack, Prometheus]]:
    binary = require_tool("prometheus")
    folder = tmp_path_factory.mktemp("live-dashboards")
    market_thread = MarketThread(
        MarketOptions(workdir=folder / "stack", prosumers=PROSUMERS, speedup=SPEEDUP)
    )
    prometheus: Prometheus | None = None
    try:
        stack = market_thread.start().stack
        _call_some_rpcs(stack.services["grid_check"].grpc_port)
        prometheus = Prometheus(
            folder, {name: service.metrics_port for name, service in stack.services.items()}
        )
        prometheus.start(binary)
        market_thread.wait_until_settled(timeout_s=240)
        _wait_for_scrapes(prometheus, len(stack.services))
        yield stack, prometheus
    finally:
        if prometheus is not None:
            prometheus.stop()
        market_thread.stop()


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
