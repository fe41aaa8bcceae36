"""Per-participant rate limits, and the rules that turn a clearing result into fills."""

from __future__ import annotations

import pytest

from services.domain.errors import ResourceExhausted
from services.order_book.domain.clearing import ClearingResultRejected, FrozenOrder, fills_from_result
from services.order_book.domain.limits import RateLimiter
from services.order_book.domain.orders import Side


def test_a_participant_may_spend_its_burst_then_waits_for_the_refill() -> None:
    limiter = RateLimiter(rate_per_s=10, burst=20)
    limiter.take("p", 15, now_s=100.0)
    with pytest.raises(ResourceExhausted) as info:
        limiter.take("p", 10, now_s=100.0)
    assert info.value.retry_after_s == pytest.approx(0.5)
    limiter.take("q", 20, now_s=100.0)  # another participant has its own bucket
    limiter.take("p", 10, now_s=100.5)
    with pytest.raises(ResourceExhausted):
        limiter.take("p", 1, now_s=100.5)


def test_the_bucket_never_holds_more_than_the_burst() -> None:
    limiter = RateLimiter(rate_per_s=10, burst=20)
    limiter.take("p", 1, now_s=0.0)
    limiter.take("p", 20, now_s=1000.0)
    with pytest.raises(ResourceExhausted):
        limiter.take("p", 1, now_s=1000.0)


def test_a_cost_above_the_burst_can_never_pass() -> None:
    with pytest.raises(ResourceExhausted, match="burst"):
        RateLimiter(rate_per_s=10, burst=20).take("p", 21, now_s=0.0)


FROZEN = [
    FrozenOrder("b1", "pa", "ca", "n1", Side.BUY, 1000, 1),
    FrozenOrder("s1", "pb", "cb", "n2", Side.SELL, 800, 2),
    FrozenOrder("s2", "pb", "cc", "n2", Side.SELL, 500, 3),
]
PRICES = [("n1", 120_000), ("n2", 110_000)]


def test_every_frozen_order_gets_one_fill_at_its_node_price_in_book_order() -> None:
    outcome = fills_from_result(
        900, 7, reversed(FROZEN), 7, PRICES, [("s1", 800), ("b1", 1000), ("u-tariff", 200)]
    )
    assert [(f.order_id, f.accepted_wh, f.price_micro_per_kwh) for f in outcome.fills] == [
        ("b1", 1000, 120_000),
        ("s1", 800, 110_000),
        ("s2", 0, 110_000),
    ]
    assert outcome.volume_wh == 1000
    assert outcome.foreign_allocations == 1
    assert outcome.node_prices == {"n1": 120_000, "n2": 110_000}


@pytest.mark.parametrize(
    ("book_seq_max", "prices", "allocations", "rule"),
    [
        (8, PRICES, [("b1", 1)], "frozen at 7"),
        (7, PRICES, [("b1", 1001)], "accepted 1001 Wh of 1000"),
        (7, PRICES, [("b1", -1)], "accepted -1 Wh"),
        (7, PRICES, [("b1", 1), ("b1", 1)], "allocated twice"),
        (7, PRICES, [("x", 1), ("x", 1)], "allocated twice"),
        (7, [("n1", 1), ("n1", 2)], [], "two prices"),
        (7, [("n1", 120_000)], [("s1", 10)], "has no price"),
    ],
)
def test_a_result_breaking_a_rule_is_rejected_as_a_whole(
    book_seq_max: int, prices: list[tuple[str, int]], allocations: list[tuple[str, int]], rule: str
) -> None:
    with pytest.raises(ClearingResultRejected, match=rule):
        fills_from_result(900, 7, FROZEN, book_seq_max, prices, allocations)


def test_an_unallocated_order_at_a_node_without_price_gets_an_empty_fill() -> None:
    outcome = fills_from_result(900, 7, FROZEN, 7, [("n1", 120_000)], [("b1", 0)])
    assert [(f.accepted_wh, f.price_micro_per_kwh) for f in outcome.fills] == [(0, 120_000), (0, 0), (0, 0)]
