"""From a clearing result to fills: what each frozen order of an interval got, checked against what was frozen.

Every order frozen at gate closure gets exactly one fill: its accepted energy
from the result (0 if the result does not list it) at the price of its node.
A result is rejected as a whole, with nothing applied, if it was computed on
a different order set (its `book_seq_max` is not the one recorded at gate
closure), allocates to an order twice, accepts more than an order asked for
or a negative amount, or leaves an accepted order's node without a price.
Allocations to order ids the book does not know are the matcher's own
standing orders (the utility's tariffs at the connection point); they are
counted, not filled. For the same reason the book's own orders need not
balance: the utility buys or sells the difference.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from services.order_book.domain.orders import Side


class ClearingResultRejected(ValueError):
    """A clearing result that cannot be turned into fills; the message says which rule it broke."""


@dataclass(frozen=True, slots=True)
class FrozenOrder:
    order_id: str
    participant_id: str
    client_order_id: str
    node_id: str
    side: Side
    energy_wh: int
    book_seq: int


@dataclass(frozen=True, slots=True)
class FillDraft:
    """One order's fill, before it is numbered and stored."""

    order_id: str
    participant_id: str
    client_order_id: str
    node_id: str
    side: Side
    energy_wh: int
    accepted_wh: int
    price_micro_per_kwh: int


@dataclass(frozen=True, slots=True)
class IntervalOutcome:
    fills: list[FillDraft]
    # Energy bought by the book's orders.
    volume_wh: int
    node_prices: dict[str, int]
    # Allocations to orders outside the book (the matcher's standing orders).
    foreign_allocations: int


def fills_from_result(
    interval_start_s: int,
    recorded_book_seq_max: int,
    frozen: Iterable[FrozenOrder],
    result_book_seq_max: int,
    node_prices: Iterable[tuple[str, int]],
    allocations: Iterable[tuple[str, int]],
) -> IntervalOutcome:
    """The fills of one cleared interval, in book order; raises ClearingResultRejected."""
    if result_book_seq_max != recorded_book_seq_max:
        raise ClearingResultRejected(
            f"interval {interval_start_s}: the result is for book_seq_max {result_book_seq_max}, "
            f"but the interval was frozen at {recorded_book_seq_max}"
        )
    orders = {order.order_id: order for order in frozen}
    prices: dict[str, int] = {}
    for node_id, price in node_prices:
        if node_id in prices:
            raise ClearingResultRejected(f"interval {interval_start_s}: node {node_id!r} has two prices")
        prices[node_id] = price
    accepted: dict[str, int] = {}
    foreign: set[str] = set()
    for order_id, accepted_wh in allocations:
        order = orders.get(order_id)
        if order is None:
            if order_id in foreign:
                raise ClearingResultRejected(
                    f"interval {interval_start_s}: order {order_id!r} is allocated twice"
                )
            foreign.add(order_id)
            continue
        if order_id in accepted:
            raise ClearingResultRejected(
                f"interval {interval_start_s}: order {order_id!r} is allocated twice"
            )
        if not 0 <= accepted_wh <= order.energy_wh:
            raise ClearingResultRejected(
                f"interval {interval_start_s}: order {order_id!r} accepted {accepted_wh} Wh of {order.energy_wh}"
            )
        accepted[order_id] = accepted_wh
    return _outcome(interval_start_s, orders, prices, accepted, len(foreign))


def _outcome(
    interval_start_s: int,
    orders: Mapping[str, FrozenOrder],
    prices: dict[str, int],
    accepted: dict[str, int],
    foreign_allocations: int,
) -> IntervalOutcome:
    fills = []
    bought_wh = 0
    for order in sorted(orders.values(), key=lambda o: o.book_seq):
        accepted_wh = accepted.get(order.order_id, 0)
        price = prices.get(order.node_id)
        if price is None:
            if accepted_wh:
                raise ClearingResultRejected(
                    f"interval {interval_start_s}: node {order.node_id!r} of accepted order "
                    f"{order.order_id!r} has no price"
                )
            price = 0
        if order.side == Side.BUY:
            bought_wh += accepted_wh
        fills.append(
            FillDraft(
                order.order_id,
                order.participant_id,
                order.client_order_id,
                order.node_id,
                order.side,
                order.energy_wh,
                accepted_wh,
                price,
            )
        )
    return IntervalOutcome(fills, bought_wh, prices, foreign_allocations)
