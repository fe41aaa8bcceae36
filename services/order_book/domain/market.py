"""The market's rules for an order: which intervals are open on the service clock, the price tick, and limits.

Intervals are `interval_s` long and start at multiples of `interval_s` (Unix
seconds). Interval T closes at its gate time `T - gate_closure_s`; at that
instant and after, no order, amend or cancel for T is accepted. The open
intervals are the `horizon_intervals` consecutive intervals starting with the
first one whose gate time lies strictly after now.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime

from services.domain.errors import FailedPrecondition, InvalidArgument
from services.order_book.domain.orders import (
    CLIENT_ORDER_ID_MAX_CHARS,
    OrderBody,
    Side,
    fits_i64,
    is_valid_client_order_id,
)


def iso(t_s: float) -> str:
    """A Unix time as ISO 8601 UTC, for messages."""
    return datetime.fromtimestamp(t_s, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True, slots=True)
class MarketRules:
    """Everything an order is checked against, apart from its signature and its owner's state."""

    interval_s: int
    gate_closure_s: int
    horizon_intervals: int
    price_tick_micro_per_kwh: int
    min_price_micro_per_kwh: int
    max_price_micro_per_kwh: int
    max_energy_wh: int
    nodes: frozenset[str]

    def __post_init__(self) -> None:
        if self.interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {self.interval_s}")
        if self.gate_closure_s < 0:
            raise ValueError(f"gate_closure_s must be >= 0, got {self.gate_closure_s}")
        if self.horizon_intervals <= 0:
            raise ValueError(f"horizon_intervals must be positive, got {self.horizon_intervals}")
        if self.price_tick_micro_per_kwh <= 0:
            raise ValueError(
                f"price_tick_micro_per_kwh must be positive, got {self.price_tick_micro_per_kwh}"
            )
        if not 0 < self.min_price_micro_per_kwh <= self.max_price_micro_per_kwh:
            raise ValueError("prices need 0 < min_price_micro_per_kwh <= max_price_micro_per_kwh")
        if self.max_energy_wh <= 0:
            raise ValueError(f"max_energy_wh must be positive, got {self.max_energy_wh}")
        if not self.nodes:
            raise ValueError("the market needs at least one node")

    # The calendar.

    def gate_time_s(self, interval_start_s: int) -> int:
        return interval_start_s - self.gate_closure_s

    def first_open_start_s(self, now_s: float) -> int:
        """The earliest interval whose gate time lies strictly after `now_s`."""
        length = self.interval_s
        return (int((now_s + self.gate_closure_s) // length) + 1) * length

    def last_open_start_s(self, now_s: float) -> int:
        return self.first_open_start_s(now_s) + (self.horizon_intervals - 1) * self.interval_s

    def open_starts(self, now_s: float) -> range:
        first = self.first_open_start_s(now_s)
        return range(first, first + self.horizon_intervals * self.interval_s, self.interval_s)

    def is_closed(self, interval_start_s: int, now_s: float) -> bool:
        return now_s >= self.gate_time_s(interval_start_s)

    def closed_error(self, interval_start_s: int, field: str) -> FailedPrecondition:
        gate_s = self.gate_time_s(interval_start_s)
        return FailedPrecondition(
            f"interval {iso(interval_start_s)} ({interval_start_s}) is closed: its gate closed at "
            f"{iso(gate_s)} ({gate_s})",
            field=field,
        )

    def check_interval(self, interval_start_s: int, now_s: float, field: str) -> None:
        """Raise unless `interval_start_s` is an open interval at `now_s`."""
        if interval_start_s <= 0:
            raise InvalidArgument("is required: the interval's start as a positive Unix time", field=field)
        if interval_start_s % self.interval_s:
            raise InvalidArgument(
                f"{interval_start_s} is not the start of an interval (a multiple of {self.interval_s} s)",
                field=field,
            )
        if self.is_closed(interval_start_s, now_s):
            raise self.closed_error(interval_start_s, field)
        last_s = self.last_open_start_s(now_s)
        if interval_start_s > last_s:
            raise InvalidArgument(
                f"interval {iso(interval_start_s)} ({interval_start_s}) is after the horizon: the last "
                f"open interval is {iso(last_s)} ({last_s})",
                field=field,
            )

    # The order.

    def open_window(self, now_s: float) -> tuple[int, int]:
        """The first and last open interval starts at `now_s`."""
        first = self.first_open_start_s(now_s)
        return first, first + (self.horizon_intervals - 1) * self.interval_s

    def check_body(
        self,
        body: OrderBody,
        participant_node_id: str,
        now_s: float,
        prefix: str = "body",
        window: tuple[int, int] | None = None,
    ) -> None:
        """Raise InvalidArgument (or FailedPrecondition for a closed interval) naming the first bad field.

        `window` is `open_window(now_s)`, computed once for a whole batch.
        """
        first_s, last_s = window or self.open_window(now_s)
        start_s = body.interval_start_s
        energy_wh = body.energy_wh
        price = body.price_micro_per_kwh
        # One pass over the rules for the usual, valid order; any failure is named below.
        if (
            first_s <= start_s <= last_s
            and start_s % self.interval_s == 0
            and 0 < energy_wh <= self.max_energy_wh
            and self.min_price_micro_per_kwh <= price <= self.max_price_micro_per_kwh
            and price % self.price_tick_micro_per_kwh == 0
            and body.node_id == participant_node_id
            and participant_node_id in self.nodes
            and (body.side is Side.BUY or body.side is Side.SELL)
            and is_valid_client_order_id(body.client_order_id)
        ):
            return
        self._name_the_broken_rule(body, participant_node_id, now_s, prefix)

    def _name_the_broken_rule(
        self, body: OrderBody, participant_node_id: str, now_s: float, prefix: str
    ) -> None:
        if not body.client_order_id:
            raise InvalidArgument("is required", field=f"{prefix}.client_order_id")
        if not is_valid_client_order_id(body.client_order_id):
            raise InvalidArgument(
                f"must be 1-{CLIENT_ORDER_ID_MAX_CHARS} characters of A-Z a-z 0-9 . _ : -",
                field=f"{prefix}.client_order_id",
            )
        if body.side not in (Side.BUY, Side.SELL):
            raise InvalidArgument("must be SIDE_BUY or SIDE_SELL", field=f"{prefix}.side")
        if not body.node_id:
            raise InvalidArgument("is required", field=f"{prefix}.node_id")
        if body.node_id not in self.nodes:
            raise InvalidArgument(f"unknown node {body.node_id[:64]!r}", field=f"{prefix}.node_id")
        if body.node_id != participant_node_id:
            raise InvalidArgument(
                f"the participant is registered at node {participant_node_id!r}, not {body.node_id!r}",
                field=f"{prefix}.node_id",
            )
        if body.energy_wh <= 0:
            raise InvalidArgument(
                f"must be a positive number of Wh, got {body.energy_wh}", field=f"{prefix}.energy_wh"
            )
        if body.energy_wh > self.max_energy_wh:
            raise InvalidArgument(
                f"{body.energy_wh} Wh is more than the limit of {self.max_energy_wh} Wh per order",
                field=f"{prefix}.energy_wh",
            )
        price = body.price_micro_per_kwh
        field = f"{prefix}.price_micro_per_kwh"
        if price <= 0:
            raise InvalidArgument(f"must be positive, got {price}", field=field)
        if price % self.price_tick_micro_per_kwh:
            raise InvalidArgument(
                f"{price} is not on the price tick of {self.price_tick_micro_per_kwh} micro/kWh", field=field
            )
        if not self.min_price_micro_per_kwh <= price <= self.max_price_micro_per_kwh:
            raise InvalidArgument(
                f"{price} is outside [{self.min_price_micro_per_kwh}, {self.max_price_micro_per_kwh}] micro/kWh",
                field=field,
            )
        if not fits_i64(body.interval_start_s):
            raise InvalidArgument("is out of range", field=f"{prefix}.interval_start_s")
        self.check_interval(body.interval_start_s, now_s, f"{prefix}.interval_start_s")


@dataclass(frozen=True, slots=True)
class IntervalOpened:
    """An interval entered the horizon and accepts orders until its gate time."""

    interval_start_s: int
    gate_closure_s: int


@dataclass(frozen=True, slots=True)
class IntervalClosed:
    """Gate closure: the interval's live orders with book_seq <= book_seq_max went to clearing."""

    interval_start_s: int
    book_seq_max: int
    orders: int


@dataclass(frozen=True, slots=True)
class IntervalCleared:
    """The clearing result arrived: a price per node and the volume bought."""

    interval_start_s: int
    node_prices: tuple[tuple[str, int], ...]
    volume_wh: int


MarketEvent = IntervalOpened | IntervalClosed | IntervalCleared
