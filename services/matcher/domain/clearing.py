"""The clearing of one interval, in named steps: the matcher's one entry point.

A service (or anything else) clears an interval with

    grid = load_grid(path)                          # once per topology
    request = ClearingInput.from_orders(orders, grid)   # or the columns directly
    result = clear(request, grid)                   # -> ClearingResult
    payload = result_canonical_bytes(result)        # deterministic bytes to publish
    digest = result_digest(result)                  # sha256 of them, e.g. to detect a redelivery

`clear` is pure and deterministic, so a redelivered request yields the same
payload; `result_to_json` adds the timings for humans.

Steps: `validate` the columns and put them in book order; `aggregate` orders
into price steps per (node, side, price); `allocate` solves the step LP with
OR-tools (variables, constraints and objective defined in `model`), applies
the volume rule and rounds to whole Wh; `split_to_orders` shares each step
pro rata; `set_prices` fixes whole-micro node prices by the documented rule;
`decompose` pairs buys and sells into trades. Everything is pure: same input,
in any row order, same result, byte for byte apart from the timings.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

import numpy as np
import numpy.typing as npt

from services.domain.grid import Grid
from services.matcher.domain.allocation import allocate
from services.matcher.domain.orders import ClearingInput
from services.matcher.domain.prices import set_prices
from services.matcher.domain.result import ClearingResult
from services.matcher.domain.rules import check_limits_allow_rounding, with_standing_orders
from services.matcher.domain.split import split_to_orders
from services.matcher.domain.steps import ValidOrders, aggregate, validate
from services.matcher.domain.trades import decompose

IntArray = npt.NDArray[np.int64]
T = TypeVar("T")

_INT64_SAFE = 2**62


def clear(request: ClearingInput, grid: Grid, *, initial_half_width: int | None = None) -> ClearingResult:
    """Clear one interval: welfare-maximising whole-Wh allocation, node prices, trades.

    Raises `OrderError` (a ValueError naming the row and the rule) for bad
    orders and `ConsistencyError` (a ValueError naming the line) for a meshed
    grid with a line too weak to honour with whole-Wh orders.
    """
    timings: dict[str, float] = {}

    def timed(name: str, step: Callable[[], T]) -> T:
        started = time.perf_counter()
        value = step()
        timings[name] = time.perf_counter() - started
        return value

    started = time.perf_counter()

    def validated() -> ValidOrders:
        check_limits_allow_rounding(grid)
        return validate(with_standing_orders(request, grid), grid)

    orders = timed("validate_s", validated)
    book = orders.request
    steps = timed("aggregate_s", lambda: aggregate(orders, grid))
    allocation = timed("solve_s", lambda: allocate(steps, grid, initial_half_width=initial_half_width))
    energy = np.asarray(book.energy_wh)
    accepted = timed("split_s", lambda: split_to_orders(steps, allocation.accepted_wh, energy))
    prices = timed(
        "prices_s",
        lambda: set_prices(
            steps,
            allocation.accepted_wh,
            grid,
            allocation.flows_wh,
            allocation.binding,
            lp_node_level=allocation.solution.node_level,
            lp_shadow_level=allocation.solution.line_shadow_level,
        ),
    )
    trades = timed("trades_s", lambda: decompose(accepted, np.asarray(book.is_buy)))

    # Welfare = sum over buys of p * a - sum over sells of p * a (p on the tick,
    # so tick * sum(level * signed a)); congestion rent = what buyers pay minus
    # what sellers get at their node prices; both exact integers.
    step_accepted = allocation.accepted_wh
    node_count = len(grid.nodes)
    # Steps are sorted by (node, side): per-segment sums are differences of prefix sums.
    segment_start = steps.segment_start
    accepted_prefix = _prefix_sums(step_accepted)
    total_accepted = int(accepted_prefix[-1])
    segment_accepted = np.diff(accepted_prefix[segment_start]).reshape(node_count, 2)
    net_bought = segment_accepted[:, 1] - segment_accepted[:, 0]
    largest_level = (
        max(abs(steps.base_level), abs(steps.base_level + steps.key_span - 1)) if len(steps) else 0
    )
    if largest_level * total_accepted < _INT64_SAFE:
        weighted_prefix = _prefix_sums(np.multiply(steps.level, step_accepted))
        segment_weighted = np.diff(weighted_prefix[segment_start]).reshape(node_count, 2)
        welfare_levels = int(segment_weighted[:, 1].sum()) - int(segment_weighted[:, 0].sum())
    else:
        signed = np.multiply(step_accepted, np.where(steps.is_buy, 1, -1))
        welfare_levels = sum(
            int(x) * int(y) for x, y in zip(steps.level.tolist(), signed.tolist(), strict=True)
        )
    welfare = welfare_levels * steps.tick_micro_per_kwh
    congestion_rent = sum(
        int(p) * int(n) for p, n in zip(prices.price_micro_per_kwh.tolist(), net_bought.tolist(), strict=True)
    )
    # Buys and sells balance, so each side is half of all accepted energy.
    traded = total_accepted // 2
    timings["total_s"] = time.perf_counter() - started
    return ClearingResult(
        interval_minutes=grid.interval_minutes,
        order_ids=book.order_ids,
        participant_ids=book.participant_ids,
        is_buy=np.asarray(book.is_buy),
        node_index=np.asarray(book.node_index),
        accepted_wh=accepted,
        node_ids=grid.node_ids,
        node_price_micro_per_kwh=prices.price_micro_per_kwh,
        line_ids=grid.line_ids,
        flow_wh=allocation.flows_wh,
        binding=allocation.binding,
        shadow_price_micro_per_kwh=prices.shadow_price_micro_per_kwh,
        trade_buyer_row=trades.buyer_row,
        trade_seller_row=trades.seller_row,
        trade_energy_wh=trades.energy_wh,
        welfare_nano=welfare,
        congestion_rent_nano=congestion_rent,
        traded_wh=traded,
        solver={
            "orders": len(book),
            "steps": len(steps),
            "lp_rounds": allocation.solution.rounds,
            "lp_columns": allocation.solution.columns,
            "rounding": allocation.rounding,
            "binding_lines": int(allocation.binding.sum()),
        },
        timings_s=timings,
    )


def _prefix_sums(values: IntArray) -> IntArray:
    """prefix[i] = sum of values[:i] (length len(values) + 1)."""
    prefix = np.empty(len(values) + 1, dtype=np.int64)
    prefix[0] = 0
    np.cumsum(values, out=prefix[1:])
    return prefix
