"""Settings of the order book (env prefix P2PGRID_ORDER_BOOK_)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from services.domain.credentials import ORDER_BOOK_AUDIENCE, b64url, is_valid_public_key
from services.domain.intervals import DEFAULT_GATE_CLOSURE_S, DEFAULT_INTERVAL_S
from services.order_book.domain.market import MarketRules
from services.platform.auth import parse_operator_keys
from services.platform.settings import (
    ServiceSettings,
    SettingsError,
    check_database_url,
    check_positive,
    setting,
)

DESCRIPTION = "order_book: participants, signed orders, gate closure per interval, and fills."


def _check_non_negative(value: float) -> None:
    if value < 0:
        raise ValueError(f"{value} must be >= 0")


def _check_nodes(value: str) -> None:
    if not split_list(value):
        raise ValueError("name at least one node id (comma-separated)")


def _check_grid_file(value: str) -> None:
    if value:
        _nodes_from_grid_file(value)


def _check_operator_keys(value: str) -> None:
    for key in parse_operator_keys(value):
        if not is_valid_public_key(key):
            raise ValueError(f"{b64url(key)} is not a valid Ed25519 public key")


def split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


def _nodes_from_grid_file(path: str) -> list[str]:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read grid file {path}: {exc}") from None
    nodes = data.get("nodes") if isinstance(data, dict) else None
    if not isinstance(nodes, list) or not nodes:
        raise ValueError(f"grid file {path} has no `nodes` list")
    ids = []
    for node in nodes:
        node_id = node.get("id") if isinstance(node, dict) else node
        if node_id is None or str(node_id) == "":
            raise ValueError(f"grid file {path}: a node has no id")
        ids.append(str(node_id))
    return ids


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    database_url: str = setting(help="SQLAlchemy URL of the order book's database", check=check_database_url)
    interval_s: int = setting(DEFAULT_INTERVAL_S, help="length of a delivery interval", check=check_positive)
    gate_closure_s: int = setting(
        DEFAULT_GATE_CLOSURE_S, help="gate closure lead before an interval starts", check=_check_non_negative
    )
    horizon_intervals: int = setting(
        96, help="how many intervals ahead accept orders (from the next one to close)", check=check_positive
    )
    nodes: str = setting("n0,n1,n2", help="comma-separated grid node ids orders may name", check=_check_nodes)
    grid_file: str = setting("", help="grid YAML whose `nodes` replace --nodes", check=_check_grid_file)
    price_tick_micro_per_kwh: int = setting(
        100, help="every price is a multiple of this", check=check_positive
    )
    min_price_micro_per_kwh: int = setting(100, help="lowest limit price", check=check_positive)
    max_price_micro_per_kwh: int = setting(10_000_000, help="highest limit price", check=check_positive)
    max_energy_wh: int = setting(10_000_000, help="largest energy of one order", check=check_positive)
    max_batch_orders: int = setting(1000, help="most orders in one PlaceOrders call", check=check_positive)
    rate_limit_orders_per_s: float = setting(
        1000.0, help="orders (or other calls) per second per participant", check=check_positive
    )
    rate_limit_burst: int = setting(5000, help="orders a participant may send at once", check=check_positive)
    operator_public_keys: str = setting(
        "", help="comma-separated base64url Ed25519 public keys of operators", check=_check_operator_keys
    )
    open_registration: bool = setting(
        True, help="participants may register their own key (else only operators register)"
    )
    auth_audience: str = setting(ORDER_BOOK_AUDIENCE, help="audience every call token must be signed for")
    token_max_lifetime_s: int = setting(3600, help="longest accepted token lifetime", check=check_positive)
    token_clock_skew_s: float = setting(
        30.0, help="tolerated wall-clock difference for tokens", check=_check_non_negative
    )
    verify_threads: int = setting(2, help="threads verifying order signatures", check=check_positive)
    write_batch_max_orders: int = setting(
        4000, help="most orders stored in one database transaction", check=check_positive
    )
    publish_order_events: bool = setting(
        False, help="also publish every placed, amended and cancelled order to the ORDERS stream"
    )

    def __post_init__(self) -> None:
        if self.rate_limit_burst < self.max_batch_orders:
            raise SettingsError(
                "--rate-limit-burst",
                f"{self.rate_limit_burst} must be at least --max-batch-orders ({self.max_batch_orders})",
            )
        if self.gate_closure_s >= self.interval_s * self.horizon_intervals:
            raise SettingsError("--gate-closure-s", "must be shorter than the horizon")
        try:
            self.market_rules()
        except ValueError as exc:
            raise SettingsError("--min-price-micro-per-kwh", str(exc)) from None

    def node_ids(self) -> list[str]:
        return _nodes_from_grid_file(self.grid_file) if self.grid_file else split_list(self.nodes)

    def operator_keys(self) -> frozenset[bytes]:
        return parse_operator_keys(self.operator_public_keys)

    def market_rules(self) -> MarketRules:
        return MarketRules(
            interval_s=self.interval_s,
            gate_closure_s=self.gate_closure_s,
            horizon_intervals=self.horizon_intervals,
            price_tick_micro_per_kwh=self.price_tick_micro_per_kwh,
            min_price_micro_per_kwh=self.min_price_micro_per_kwh,
            max_price_micro_per_kwh=self.max_price_micro_per_kwh,
            max_energy_wh=self.max_energy_wh,
            nodes=frozenset(self.node_ids()),
        )
