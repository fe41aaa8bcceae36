"""Build p2pgrid's Grafana dashboards (JSON under deploy/grafana/dashboards/) from one readable description.

Run from the repository root:

    .venv/bin/python deploy/grafana/build_dashboards.py          # rewrite the JSON files
    .venv/bin/python deploy/grafana/build_dashboards.py --check  # exit 1 if any is stale

Every query names only metrics declared in services/platform/metrics.py
(counters as `<name>` ending in `_total`, histograms through `_bucket`,
`_sum` and `_count`); the deployment tests hold every panel to that and run
each query through promtool and a live Prometheus. Variables: `$node`,
`$line`, `$meter` and `$service` are multi-value regexes (All = `.*`);
`$__rate_interval` and `$__range` are Grafana's own.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

DASHBOARDS_DIR = Path(__file__).resolve().parent / "dashboards"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SCHEMA_VERSION = 39


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str = ""
    instant: bool = False


@dataclass(frozen=True)
class Panel:
    title: str
    description: str
    queries: tuple[Query, ...]
    kind: str = "timeseries"  # timeseries, stat, table, bargauge
    unit: str = "short"
    width: int = 12
    height: int = 8
    decimals: int | None = None
    thresholds: tuple[tuple[float, str], ...] = ()
    stacked: bool = False
    max_value: float | None = None


@dataclass(frozen=True)
class Row:
    title: str
    panels: tuple[Panel, ...]


@dataclass(frozen=True)
class Variable:
    name: str
    label: str
    query: str  # label_values(<metric>, <label>)


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    rows: tuple[Row, ...]
    variables: tuple[Variable, ...] = ()
    tags: tuple[str, ...] = field(default=("p2pgrid",))


def q(expr: str, legend: str = "") -> Query:
    return Query(expr, legend)


def instant(expr: str, legend: str = "") -> Query:
    return Query(expr, legend, instant=True)


RATE = "$__rate_interval"

MARKET = Dashboard(
    uid="p2pgrid-market",
    title="p2pgrid / Market overview",
    description="Prices per node, cleared volumes, welfare, orders and settlement of the local electricity market.",
    variables=(Variable("node", "Node", "label_values(p2pgrid_node_price_micro_per_kwh, node)"),),
    rows=(
        Row(
            "Clearing",
            (
                Panel(
                    "Intervals cleared",
                    "Delivery intervals cleared and published by the matcher in the selected time range.",
                    (instant("sum(increase(p2pgrid_intervals_cleared_total[$__range]))"),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                ),
                Panel(
                    "Gate closures",
                    "Intervals frozen by the order book at gate closure in the selected time range.",
                    (instant("sum(increase(p2pgrid_gate_closures_total[$__range]))"),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                ),
                Panel(
                    "Binding lines",
                    "Lines whose limit was binding in the last clearing: nodal prices differ only because of these.",
                    (instant("sum(p2pgrid_line_binding)"),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                    thresholds=((0, "green"), (1, "orange")),
                ),
                Panel(
                    "Price spread across nodes",
                    "Highest minus lowest node price of the last clearing (0 when no line is binding).",
                    (
                        instant(
                            "(max(p2pgrid_node_price_micro_per_kwh) - min(p2pgrid_node_price_micro_per_kwh)) / 1e6"
                        ),
                    ),
                    kind="stat",
                    unit="suffix: /kWh",
                    width=6,
                    height=4,
                    decimals=4,
                ),
                Panel(
                    "Price per node",
                    "Last cleared price of each node, in currency per kWh.",
                    (q('p2pgrid_node_price_micro_per_kwh{node=~"$node"} / 1e6', "{{node}}"),),
                    unit="suffix: /kWh",
                    width=24,
                    height=9,
                    decimals=4,
                ),
                Panel(
                    "Cleared volume",
                    "Energy traded in the last cleared interval.",
                    (q("p2pgrid_clearing_volume_wh", "volume"),),
                    unit="watth",
                    width=8,
                ),
                Panel(
                    "Welfare",
                    "Welfare (buyers' value minus sellers' cost) of the last cleared interval, in currency.",
                    (q("p2pgrid_clearing_welfare_nano / 1e9", "welfare"),),
                    width=8,
                    decimals=2,
                ),
                Panel(
                    "Orders per clearing",
                    "Orders in the last cleared interval.",
                    (q("p2pgrid_clearing_orders", "orders"),),
                    width=8,
                    decimals=0,
                ),
            ),
        ),
        Row(
            "Orders",
            (
                Panel(
                    "Orders accepted",
                    "Orders accepted and persisted by the order book, per second, by side.",
                    (q(f"sum by (side) (rate(p2pgrid_orders_accepted_total[{RATE}]))", "{{side}}"),),
                    unit="ops",
                    width=8,
                    stacked=True,
                ),
                Panel(
                    "Orders rejected",
                    "Orders rejected, per second, by gRPC status code.",
                    (q(f"sum by (code) (rate(p2pgrid_orders_rejected_total[{RATE}]))", "{{code}}"),),
                    unit="ops",
                    width=8,
                    stacked=True,
                ),
                Panel(
                    "Live orders",
                    "Live orders in the order book, per open delivery interval.",
                    (q("sum by (interval) (p2pgrid_orders_live)", "{{interval}}"),),
                    width=8,
                    stacked=True,
                ),
                Panel(
                    "Fills",
                    "Fills delivered to their orders, per second.",
                    (q(f"sum(rate(p2pgrid_fills_total[{RATE}]))", "fills"),),
                    unit="ops",
                    width=12,
                ),
                Panel(
                    "Rejection ratio",
                    "Share of orders rejected among all orders received.",
                    (
                        q(
                            f"sum(rate(p2pgrid_orders_rejected_total[{RATE}])) / "
                            f"(sum(rate(p2pgrid_orders_rejected_total[{RATE}])) + "
                            f"sum(rate(p2pgrid_orders_accepted_total[{RATE}])))",
                            "rejected",
                        ),
                    ),
                    unit="percentunit",
                    width=12,
                    max_value=1,
                ),
            ),
        ),
        Row(
            "Settlement",
            (
                Panel(
                    "Intervals settled",
                    "Intervals settled by the ledger in the selected time range.",
                    (instant("sum(increase(p2pgrid_ledger_intervals_settled_total[$__range]))"),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                ),
                Panel(
                    "Settlement lag",
                    "Time from the end of the last settled interval to its settlement.",
                    (instant("max(p2pgrid_ledger_settlement_lag_seconds)"),),
                    kind="stat",
                    unit="s",
                    width=6,
                    height=4,
                    thresholds=((0, "green"), (1800, "orange"), (3600, "red")),
                ),
                Panel(
                    "Hash chain",
                    "Entries in the ledger's hash chain.",
                    (instant("max(p2pgrid_ledger_chain_size)"),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                ),
                Panel(
                    "Transfers",
                    "Transfers appended to the ledger in the selected time range.",
                    (instant("sum(increase(p2pgrid_ledger_transfers_total[$__range]))"),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                ),
                Panel(
                    "Money settled",
                    "Money moved by settlement per interval of the graph, by kind, in currency.",
                    (
                        q(
                            f"sum by (kind) (increase(p2pgrid_ledger_settled_amount_nano_total[{RATE}])) / 1e9",
                            "{{kind}}",
                        ),
                    ),
                    width=12,
                    stacked=True,
                    decimals=2,
                ),
                Panel(
                    "Transfers by kind",
                    "Transfers appended to the ledger, per second, by kind.",
                    (q(f"sum by (kind) (rate(p2pgrid_ledger_transfers_total[{RATE}]))", "{{kind}}"),),
                    unit="ops",
                    width=12,
                    stacked=True,
                ),
            ),
        ),
    ),
)

GRID = Dashboard(
    uid="p2pgrid-grid",
    title="p2pgrid / Grid",
    description="Line loading, node injections, limit violations and grid_check's verdicts on clearing results.",
    variables=(
        Variable("line", "Line", "label_values(p2pgrid_line_loading_percent, line)"),
        Variable("node", "Node", "label_values(p2pgrid_node_injection_w, node)"),
    ),
    rows=(
        Row(
            "Live flows",
            (
                Panel(
                    "Most loaded line",
                    "Highest live loading of any line, in percent of its limit.",
                    (instant("max(p2pgrid_line_loading_percent)"),),
                    kind="stat",
                    unit="percent",
                    width=6,
                    height=4,
                    thresholds=((0, "green"), (80, "orange"), (100, "red")),
                ),
                Panel(
                    "Lines over their limit",
                    "Lines whose live loading exceeds 100 % now.",
                    (instant("count(p2pgrid_line_loading_percent > 100) or vector(0)"),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                    thresholds=((0, "green"), (1, "red")),
                ),
                Panel(
                    "Violations",
                    "Line limit violations in the selected time range (live and in clearing results).",
                    (instant("sum(increase(p2pgrid_grid_violations_total[$__range]))"),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                    thresholds=((0, "green"), (1, "red")),
                ),
                Panel(
                    "Failed verdicts",
                    "Clearing results that grid_check's independent re-check did not pass: each one means the matcher is wrong.",
                    (
                        instant(
                            'sum(increase(p2pgrid_grid_verdicts_total{outcome!="pass"}[$__range])) or vector(0)'
                        ),
                    ),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                    thresholds=((0, "green"), (1, "red")),
                ),
                Panel(
                    "Line loading",
                    "Live loading of each line, in percent of its limit.",
                    (q('p2pgrid_line_loading_percent{line=~"$line"}', "{{line}}"),),
                    unit="percent",
                    width=24,
                    height=9,
                    thresholds=((0, "green"), (80, "orange"), (100, "red")),
                ),
                Panel(
                    "Ten most loaded lines",
                    "The ten lines with the highest live loading.",
                    (instant("topk(10, p2pgrid_line_loading_percent)", "{{line}}"),),
                    kind="bargauge",
                    unit="percent",
                    width=12,
                    height=9,
                    thresholds=((0, "green"), (80, "orange"), (100, "red")),
                    max_value=120,
                ),
                Panel(
                    "Net injection per node",
                    "Live net injection of each node, positive into the grid.",
                    (q('p2pgrid_node_injection_w{node=~"$node"}', "{{node}}"),),
                    unit="watt",
                    width=12,
                    height=9,
                ),
            ),
        ),
        Row(
            "Clearing results",
            (
                Panel(
                    "Verdicts",
                    "Clearing results re-checked by grid_check, by outcome.",
                    (q(f"sum by (outcome) (increase(p2pgrid_grid_verdicts_total[{RATE}]))", "{{outcome}}"),),
                    width=8,
                    stacked=True,
                    decimals=0,
                ),
                Panel(
                    "Violations by source",
                    "Line limit violations, live or found in a clearing result.",
                    (q(f"sum by (source) (increase(p2pgrid_grid_violations_total[{RATE}]))", "{{source}}"),),
                    width=8,
                    stacked=True,
                    decimals=0,
                ),
                Panel(
                    "Binding lines in the last clearing",
                    "1 where the line's limit was binding when the matcher last cleared.",
                    (q('p2pgrid_line_binding{line=~"$line"}', "{{line}}"),),
                    width=8,
                    stacked=True,
                    decimals=0,
                ),
                Panel(
                    "Violations by line",
                    "Violations per line and source in the selected time range.",
                    (
                        instant(
                            "sum by (line, source) (increase(p2pgrid_grid_violations_total[$__range])) > 0"
                        ),
                    ),
                    kind="table",
                    width=24,
                    decimals=0,
                ),
            ),
        ),
    ),
)

METERING = Dashboard(
    uid="p2pgrid-metering",
    title="p2pgrid / Metering",
    description="Meter readings, meter health and data quality (validation, estimation and editing).",
    variables=(Variable("meter", "Meter", "label_values(p2pgrid_meter_last_reading_age_seconds, meter)"),),
    rows=(
        Row(
            "Readings",
            (
                Panel(
                    "Readings per second",
                    "Meter readings received per second.",
                    (instant(f"sum(rate(p2pgrid_meter_readings_total[{RATE}]))"),),
                    kind="stat",
                    unit="ops",
                    width=6,
                    height=4,
                ),
                Panel(
                    "Meters offline",
                    "Polled meters that do not answer now.",
                    (instant("sum(p2pgrid_meter_offline) or vector(0)"),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                    thresholds=((0, "green"), (1, "orange")),
                ),
                Panel(
                    "Stale meters",
                    "Meters whose newest reading is older than one 15-minute interval.",
                    (instant("count(p2pgrid_meter_last_reading_age_seconds > 900) or vector(0)"),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                    thresholds=((0, "green"), (1, "orange")),
                ),
                Panel(
                    "Poll success",
                    "Share of Modbus polls that succeeded.",
                    (
                        instant(
                            f'sum(rate(p2pgrid_meter_polls_total{{outcome="ok"}}[{RATE}])) / '
                            f"sum(rate(p2pgrid_meter_polls_total[{RATE}]))"
                        ),
                    ),
                    kind="stat",
                    unit="percentunit",
                    width=6,
                    height=4,
                    thresholds=((0, "red"), (0.95, "orange"), (0.99, "green")),
                ),
                Panel(
                    "Readings by source and quality",
                    "Meter readings received per second, by source (poll or push) and quality.",
                    (
                        q(
                            f"sum by (source, quality) (rate(p2pgrid_meter_readings_total[{RATE}]))",
                            "{{source}} {{quality}}",
                        ),
                    ),
                    unit="ops",
                    width=12,
                    stacked=True,
                ),
                Panel(
                    "Modbus polls by outcome",
                    "Modbus polls per second, by outcome.",
                    (q(f"sum by (outcome) (rate(p2pgrid_meter_polls_total[{RATE}]))", "{{outcome}}"),),
                    unit="ops",
                    width=12,
                    stacked=True,
                ),
            ),
        ),
        Row(
            "Meter health",
            (
                Panel(
                    "Age of the newest reading",
                    "Age of each meter's newest reading.",
                    (q('p2pgrid_meter_last_reading_age_seconds{meter=~"$meter"}', "{{meter}}"),),
                    unit="s",
                    width=12,
                    thresholds=((0, "green"), (900, "orange")),
                ),
                Panel(
                    "Offline meters",
                    "Meters that are offline now.",
                    (instant("p2pgrid_meter_offline == 1", "{{meter}}"),),
                    kind="table",
                    width=12,
                    decimals=0,
                ),
                Panel(
                    "Oldest readings",
                    "The twenty meters with the oldest newest reading.",
                    (instant("topk(20, p2pgrid_meter_last_reading_age_seconds)", "{{meter}}"),),
                    kind="bargauge",
                    unit="s",
                    width=24,
                    height=9,
                    thresholds=((0, "green"), (900, "orange"), (3600, "red")),
                ),
            ),
        ),
        Row(
            "Data quality",
            (
                Panel(
                    "Reading quality",
                    "Share of readings by quality flag.",
                    (
                        q(
                            f"sum by (quality) (rate(p2pgrid_meter_readings_total[{RATE}])) / ignoring (quality) "
                            f"group_left sum(rate(p2pgrid_meter_readings_total[{RATE}]))",
                            "{{quality}}",
                        ),
                    ),
                    unit="percentunit",
                    width=8,
                    stacked=True,
                    max_value=1,
                ),
                Panel(
                    "Invalid values by reason",
                    "Invalid values per second, by reason (sentinel, NaN, backwards counter, range ...).",
                    (q(f"sum by (reason) (rate(p2pgrid_meter_invalid_total[{RATE}]))", "{{reason}}"),),
                    unit="ops",
                    width=8,
                    stacked=True,
                ),
                Panel(
                    "Interval energy by flag",
                    "Meter interval energies published per second: measured, interpolated or estimated.",
                    (
                        q(
                            f"sum by (flag) (rate(p2pgrid_interval_energy_published_total[{RATE}]))",
                            "{{flag}}",
                        ),
                    ),
                    unit="ops",
                    width=8,
                    stacked=True,
                ),
                Panel(
                    "Meters with invalid values",
                    "Invalid values per meter and reason in the selected time range.",
                    (
                        instant(
                            "sum by (meter, reason) (increase(p2pgrid_meter_invalid_total[$__range])) > 0"
                        ),
                    ),
                    kind="table",
                    width=24,
                    decimals=0,
                ),
            ),
        ),
    ),
)

SERVICES = Dashboard(
    uid="p2pgrid-services",
    title="p2pgrid / Services",
    description="gRPC rates, latencies and errors, NATS traffic and lag, outboxes, clearing and settlement times.",
    variables=(Variable("service", "Service", "label_values(p2pgrid_service_up, service)"),),
    rows=(
        Row(
            "Health",
            (
                Panel(
                    "Services serving",
                    "Services that report they are serving.",
                    (instant('sum(p2pgrid_service_up{service=~"$service"})'),),
                    kind="stat",
                    width=6,
                    height=4,
                    decimals=0,
                ),
                Panel(
                    "Service status",
                    "1 while a service is serving, 0 while it stops.",
                    (q('p2pgrid_service_up{service=~"$service"}', "{{service}}"),),
                    width=18,
                    height=4,
                    decimals=0,
                ),
            ),
        ),
        Row(
            "gRPC",
            (
                Panel(
                    "Requests",
                    "gRPC calls per second, by service and method.",
                    (
                        q(
                            f'sum by (service, method) (rate(p2pgrid_grpc_requests_total{{service=~"$service"}}[{RATE}]))',
                            "{{service}} {{method}}",
                        ),
                    ),
                    unit="reqps",
                    width=12,
                    stacked=True,
                ),
                Panel(
                    "Errors",
                    "gRPC calls per second that did not end OK, by service and status code.",
                    (
                        q(
                            f'sum by (service, code) (rate(p2pgrid_grpc_requests_total{{service=~"$service", code!="OK"}}[{RATE}]))',
                            "{{service}} {{code}}",
                        ),
                    ),
                    unit="reqps",
                    width=12,
                    stacked=True,
                ),
                Panel(
                    "Latency p99",
                    "99th percentile of gRPC call latency, by service and method.",
                    (
                        q(
                            "histogram_quantile(0.99, sum by (service, method, le) "
                            f'(rate(p2pgrid_grpc_request_duration_seconds_bucket{{service=~"$service"}}[{RATE}])))',
                            "{{service}} {{method}}",
                        ),
                    ),
                    unit="s",
                    width=12,
                ),
                Panel(
                    "Latency p50 and mean",
                    "Median and mean gRPC call latency, by service.",
                    (
                        q(
                            "histogram_quantile(0.5, sum by (service, le) "
                            f'(rate(p2pgrid_grpc_request_duration_seconds_bucket{{service=~"$service"}}[{RATE}])))',
                            "p50 {{service}}",
                        ),
                        q(
                            f'sum by (service) (rate(p2pgrid_grpc_request_duration_seconds_sum{{service=~"$service"}}[{RATE}])) / '
                            f'sum by (service) (rate(p2pgrid_grpc_request_duration_seconds_count{{service=~"$service"}}[{RATE}]))',
                            "mean {{service}}",
                        ),
                    ),
                    unit="s",
                    width=12,
                ),
                Panel(
                    "Error ratio",
                    "Share of gRPC calls that did not end OK, by service.",
                    (
                        q(
                            f'sum by (service) (rate(p2pgrid_grpc_requests_total{{service=~"$service", code!="OK"}}[{RATE}])) / '
                            f'sum by (service) (rate(p2pgrid_grpc_requests_total{{service=~"$service"}}[{RATE}]))',
                            "{{service}}",
                        ),
                    ),
                    unit="percentunit",
                    width=24,
                    max_value=1,
                ),
            ),
        ),
        Row(
            "NATS and outboxes",
            (
                Panel(
                    "Published",
                    "Messages published to JetStream and acknowledged, per second, by service and stream.",
                    (
                        q(
                            f'sum by (service, stream) (rate(p2pgrid_nats_published_total{{service=~"$service"}}[{RATE}]))',
                            "{{service}} → {{stream}}",
                        ),
                    ),
                    unit="ops",
                    width=12,
                    stacked=True,
                ),
                Panel(
                    "Consumed",
                    "Messages consumed per second, by service, stream and outcome (applied or duplicate).",
                    (
                        q(
                            f'sum by (service, stream, outcome) (rate(p2pgrid_nats_consumed_total{{service=~"$service"}}[{RATE}]))',
                            "{{service}} ← {{stream}} {{outcome}}",
                        ),
                    ),
                    unit="ops",
                    width=12,
                    stacked=True,
                ),
                Panel(
                    "Consumer lag",
                    "Messages waiting for each durable consumer (not yet delivered or not yet acknowledged).",
                    (
                        q(
                            'sum by (service, consumer) (p2pgrid_nats_consumer_pending{service=~"$service"})',
                            "{{service}} {{consumer}}",
                        ),
                    ),
                    width=12,
                    decimals=0,
                ),
                Panel(
                    "Outbox backlog",
                    "Events written to a service's outbox and not yet relayed to NATS.",
                    (q('sum by (service) (p2pgrid_outbox_pending{service=~"$service"})', "{{service}}"),),
                    width=12,
                    decimals=0,
                ),
            ),
        ),
        Row(
            "Clearing and settlement",
            (
                Panel(
                    "Clearing time",
                    "Time the matcher takes to clear one interval: 50th and 99th percentile and mean.",
                    (
                        q(
                            "histogram_quantile(0.5, sum by (le) "
                            f"(rate(p2pgrid_clearing_duration_seconds_bucket[{RATE}])))",
                            "p50",
                        ),
                        q(
                            "histogram_quantile(0.99, sum by (le) "
                            f"(rate(p2pgrid_clearing_duration_seconds_bucket[{RATE}])))",
                            "p99",
                        ),
                        q(
                            f"sum(rate(p2pgrid_clearing_duration_seconds_sum[{RATE}])) / "
                            f"sum(rate(p2pgrid_clearing_duration_seconds_count[{RATE}]))",
                            "mean",
                        ),
                    ),
                    unit="s",
                    width=12,
                ),
                Panel(
                    "Settlement lag",
                    "Time from the end of an interval to its settlement by the ledger.",
                    (q("max(p2pgrid_ledger_settlement_lag_seconds)", "lag"),),
                    unit="s",
                    width=12,
                ),
            ),
        ),
    ),
)

DASHBOARDS: tuple[Dashboard, ...] = (MARKET, GRID, METERING, SERVICES)


def _variable_json(variable: Variable) -> dict[str, Any]:
    return {
        "name": variable.name,
        "label": variable.label,
        "type": "query",
        "datasource": DATASOURCE,
        "definition": variable.query,
        "query": {"query": variable.query, "refId": f"{variable.name}-values"},
        "refresh": 2,
        "sort": 1,
        "multi": True,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "hide": 0,
        "options": [],
        "regex": "",
        "skipUrlSync": False,
    }


def _thresholds(panel: Panel) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    if panel.thresholds:
        steps = [
            {"color": color, "value": None if index == 0 else value}
            for index, (value, color) in enumerate(panel.thresholds)
        ]
    return {"mode": "absolute", "steps": steps}


def _panel_json(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit, "thresholds": _thresholds(panel)}
    if panel.decimals is not None:
        defaults["decimals"] = panel.decimals
    if panel.max_value is not None:
        defaults["max"] = panel.max_value
        defaults["min"] = 0
    options: dict[str, Any]
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 20 if panel.stacked else 0,
            "showPoints": "never",
            "spanNulls": False,
            "stacking": {"mode": "normal" if panel.stacked else "none", "group": "A"},
            "thresholdsStyle": {"mode": "dashed" if panel.thresholds else "off"},
        }
        options = {
            "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
            "tooltip": {"mode": "multi", "sort": "desc"},
        }
    elif panel.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "colorMode": "value",
            "graphMode": "none",
            "justifyMode": "auto",
            "textMode": "auto",
        }
    elif panel.kind == "bargauge":
        defaults["color"] = {"mode": "thresholds"}
        options = {
            "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
            "displayMode": "gradient",
            "orientation": "horizontal",
            "showUnfilled": True,
        }
    elif panel.kind == "table":
        options = {"showHeader": True, "cellHeight": "sm", "footer": {"show": False}}
    else:
        raise ValueError(f"panel {panel.title!r}: unknown kind {panel.kind!r}")
    targets = []
    for index, query in enumerate(panel.queries):
        target: dict[str, Any] = {
            "refId": chr(ord("A") + index),
            "datasource": DATASOURCE,
            "expr": query.expr,
            "legendFormat": query.legend or "__auto",
            "range": not query.instant,
            "instant": query.instant,
        }
        if panel.kind == "table":
            target["format"] = "table"
        targets.append(target)
    result: dict[str, Any] = {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"h": panel.height, "w": panel.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": targets,
    }
    if panel.kind == "table":
        result["transformations"] = [
            {"id": "organize", "options": {"excludeByName": {"Time": True}, "renameByName": {}}}
        ]
    return result


def dashboard_json(dashboard: Dashboard) -> dict[str, Any]:
    panels: list[dict[str, Any]] = []
    panel_id = 1
    y = 0
    for row in dashboard.rows:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        x = 0
        line_height = 0
        for panel in row.panels:
            if x + panel.width > 24:
                y += line_height
                x = 0
                line_height = 0
            panels.append(_panel_json(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height
    return {
        "uid": dashboard.uid,
        "title": dashboard.title,
        "description": dashboard.description,
        "tags": list(dashboard.tags),
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "annotations": {"list": []},
        "links": [
            {
                "type": "dashboards",
                "title": "p2pgrid",
                "tags": ["p2pgrid"],
                "asDropdown": True,
                "includeVars": False,
                "keepTime": True,
            }
        ],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                    "refresh": 1,
                    "regex": "",
                    "options": [],
                },
                *(_variable_json(variable) for variable in dashboard.variables),
            ]
        },
        "panels": panels,
    }


def rendered() -> dict[Path, str]:
    return {
        DASHBOARDS_DIR / f"{dashboard.uid}.json": json.dumps(
            dashboard_json(dashboard), indent=2, ensure_ascii=False
        )
        + "\n"
        for dashboard in DASHBOARDS
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files; exit 1 if any")
    args = parser.parse_args(argv)
    stale: list[str] = []
    for path, text in rendered().items():
        current = path.read_text() if path.exists() else None
        if current != text:
            if args.check:
                stale.append(path.name)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)
    for name in stale:
        print(f"stale: deploy/grafana/dashboards/{name}", file=sys.stderr)
    if stale:
        print("run: .venv/bin/python deploy/grafana/build_dashboards.py", file=sys.stderr)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
