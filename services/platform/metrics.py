"""The one declared list of p2pgrid's Prometheus metrics, and the /metrics endpoint every service serves.

Every metric any service exports is declared here once (name, type, unit,
labels, help), so dashboards and services agree by construction. A service
builds a `Metrics` object on its own registry (no global state) and gets its
instruments by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from threading import Thread
from typing import Literal
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

Kind = Literal["counter", "gauge", "histogram"]

LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(frozen=True, slots=True)
class MetricSpec:
    name: str
    kind: Kind
    unit: str
    labels: tuple[str, ...]
    help: str
    buckets: tuple[float, ...] = LATENCY_BUCKETS_S


def _m(name: str, kind: Kind, unit: str, labels: tuple[str, ...], help: str) -> MetricSpec:
    return MetricSpec(name, kind, unit, labels, help)


# Names follow Prometheus conventions: unit suffix, `_total` for counters.
CATALOG: tuple[MetricSpec, ...] = (
    # Every service.
    _m(
        "p2pgrid_grpc_requests_total",
        "counter",
        "requests",
        ("service", "method", "code"),
        "gRPC calls by method and status code",
    ),
    _m(
        "p2pgrid_grpc_request_duration_seconds",
        "histogram",
        "seconds",
        ("service", "method"),
        "gRPC call latency",
    ),
    _m(
        "p2pgrid_nats_published_total",
        "counter",
        "messages",
        ("service", "stream"),
        "messages published to JetStream and acknowledged",
    ),
    _m(
        "p2pgrid_nats_consumed_total",
        "counter",
        "messages",
        ("service", "stream", "outcome"),
        "messages consumed (applied or duplicate)",
    ),
    _m(
        "p2pgrid_nats_consumer_pending",
        "gauge",
        "messages",
        ("service", "consumer"),
        "messages waiting for a consumer (lag)",
    ),
    _m(
        "p2pgrid_outbox_pending",
        "gauge",
        "events",
        ("service",),
        "events written to the outbox and not yet relayed",
    ),
    _m("p2pgrid_service_up", "gauge", "bool", ("service",), "1 while the service is serving"),
    # order_book
    _m("p2pgrid_orders_accepted_total", "counter", "orders", ("side",), "orders accepted and persisted"),
    _m("p2pgrid_orders_rejected_total", "counter", "orders", ("code",), "orders rejected, by status code"),
    _m("p2pgrid_orders_live", "gauge", "orders", ("interval",), "live orders per open interval"),
    _m("p2pgrid_gate_closures_total", "counter", "intervals", (), "intervals frozen at gate closure"),
    _m("p2pgrid_fills_total", "counter", "fills", (), "fills delivered to their orders"),
    # matcher
    _m("p2pgrid_clearing_duration_seconds", "histogram", "seconds", (), "time to clear one interval"),
    _m("p2pgrid_clearing_orders", "gauge", "orders", (), "orders in the last cleared interval"),
    _m("p2pgrid_clearing_volume_wh", "gauge", "Wh", (), "energy traded in the last cleared interval"),
    _m("p2pgrid_clearing_welfare_nano", "gauge", "nano-currency", (), "welfare of the last cleared interval"),
    _m(
        "p2pgrid_node_price_micro_per_kwh",
        "gauge",
        "micro-currency/kWh",
        ("node",),
        "last cleared price per node",
    ),
    _m(
        "p2pgrid_line_binding",
        "gauge",
        "bool",
        ("line",),
        "1 if the line limit was binding in the last clearing",
    ),
    _m("p2pgrid_intervals_cleared_total", "counter", "intervals", (), "intervals cleared and published"),
    # grid_check
    _m(
        "p2pgrid_line_loading_percent",
        "gauge",
        "percent",
        ("line",),
        "live line loading, percent of its limit",
    ),
    _m(
        "p2pgrid_node_injection_w",
        "gauge",
        "W",
        ("node",),
        "live net injection per node, positive into the grid",
    ),
    _m(
        "p2pgrid_grid_violations_total",
        "counter",
        "violations",
        ("line", "source"),
        "line limit violations (live or in a clearing result)",
    ),
    _m(
        "p2pgrid_grid_verdicts_total",
        "counter",
        "verdicts",
        ("outcome",),
        "clearing results re-checked, by outcome",
    ),
    # meter_ingest
    _m(
        "p2pgrid_meter_readings_total",
        "counter",
        "readings",
        ("source", "quality"),
        "meter readings received, by source and quality",
    ),
    _m(
        "p2pgrid_meter_last_reading_age_seconds",
        "gauge",
        "seconds",
        ("meter",),
        "age of each meter's newest reading",
    ),
    _m(
        "p2pgrid_meter_invalid_total", "counter", "readings", ("meter", "reason"), "invalid values, by reason"
    ),
    _m("p2pgrid_meter_offline", "gauge", "bool", ("meter",), "1 while a polled meter is offline"),
    _m("p2pgrid_meter_polls_total", "counter", "polls", ("outcome",), "Modbus polls, by outcome"),
    _m(
        "p2pgrid_interval_energy_published_total",
        "counter",
        "intervals",
        ("flag",),
        "meter interval energies published, by flag",
    ),
    # ledger
    _m(
        "p2pgrid_ledger_transfers_total",
        "counter",
        "transfers",
        ("kind",),
        "transfers appended to the ledger",
    ),
    _m("p2pgrid_ledger_intervals_settled_total", "counter", "intervals", (), "intervals settled"),
    _m(
        "p2pgrid_ledger_settlement_lag_seconds",
        "gauge",
        "seconds",
        (),
        "time from interval end to its settlement",
    ),
    _m("p2pgrid_ledger_chain_size", "gauge", "entries", (), "entries in the hash chain"),
    _m(
        "p2pgrid_ledger_settled_amount_nano_total",
        "counter",
        "nano-currency",
        ("kind",),
        "money moved by settlement",
    ),
)

SPECS: dict[str, MetricSpec] = {spec.name: spec for spec in CATALOG}


class Metrics:
    """A service's instruments, created on demand from the catalog on a private registry."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self._instruments: dict[str, Counter | Gauge | Histogram] = {}

    def _get(self, name: str) -> Counter | Gauge | Histogram:
        instrument = self._instruments.get(name)
        if instrument is None:
            spec = SPECS.get(name)
            if spec is None:
                raise KeyError(f"metric {name!r} is not declared in services/platform/metrics.py")
            if spec.kind == "counter":
                # prometheus_client appends `_total` itself.
                instrument = Counter(
                    spec.name.removesuffix("_total"), spec.help, spec.labels, registry=self.registry
                )
            elif spec.kind == "gauge":
                instrument = Gauge(spec.name, spec.help, spec.labels, registry=self.registry)
            else:
                instrument = Histogram(
                    spec.name, spec.help, spec.labels, registry=self.registry, buckets=spec.buckets
                )
            self._instruments[name] = instrument
        return instrument

    def counter(self, name: str) -> Counter:
        instrument = self._get(name)
        if not isinstance(instrument, Counter):
            raise TypeError(f"{name} is not a counter")
        return instrument

    def gauge(self, name: str) -> Gauge:
        instrument = self._get(name)
        if not isinstance(instrument, Gauge):
            raise TypeError(f"{name} is not a gauge")
        return instrument

    def histogram(self, name: str) -> Histogram:
        instrument = self._get(name)
        if not isinstance(instrument, Histogram):
            raise TypeError(f"{name} is not a histogram")
        return instrument


class MetricsServer:
    """The /metrics HTTP endpoint of one service."""

    def __init__(self, metrics: Metrics, host: str, port: int) -> None:
        self._server: WSGIServer
        self._thread: Thread
        self._server, self._thread = start_http_server(port, addr=host, registry=metrics.registry)
        self.port: int = self._server.server_port

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2)
