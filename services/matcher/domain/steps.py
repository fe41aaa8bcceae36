"""Validation of the clearing input and its aggregation into price steps.

Orders at the same node, on the same side and at the same price are one step
of that node's supply or demand curve: the LP is built over steps, not
orders, and each step is split back to its orders afterwards. Prices lie on
the market's tick, so a step is identified exactly by its price level
(`price_micro_per_kwh // tick`) and the merge loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.domain.grid import Grid
from services.matcher.domain.orders import (
    MAX_ABS_PRICE_MICRO_PER_KWH,
    MAX_BOOK_ENERGY_WH,
    MAX_ORDER_ENERGY_WH,
    ClearingInput,
    OrderError,
)

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Dense aggregation (a bincount over node x side x price level) is used while
# its table stays within this many cells per order (or 2**20 in all);
# beyond that (very wide price ranges) a sort-based grouping takes over.
_DENSE_CELLS_PER_ORDER = 4
_DENSE_CELLS_MIN = 1 << 20


@dataclass(frozen=True, eq=False)
class ValidOrders:
    """The input in book order (ascending sequence) with each order's price level."""

    request: ClearingInput
    level: IntArray
    # Position of each book-ordered order in the caller's input.
    input_row: IntArray | None


@dataclass(frozen=True, eq=False)
class PriceSteps:
    """Orders merged into steps, sorted by node, then side (sells before buys), then price level.

    The steps of node n and side s (0 sell, 1 buy) are
    `segment_start[2n + s] : segment_start[2n + s + 1]`.
    """

    node: IntArray
    is_buy: BoolArray
    level: IntArray
    energy_wh: IntArray
    segment_start: IntArray
    order_step: IntArray
    tick_micro_per_kwh: int

    def __len__(self) -> int:
        return len(self.level)

    @property
    def sign(self) -> npt.NDArray[np.float64]:
        """+1 for sells (energy into the node), -1 for buys."""
        return np.where(self.is_buy, -1.0, 1.0)


def validate(request: ClearingInput, grid: Grid) -> ValidOrders:
    """Check every rule on the columns (naming the first offending row) and put the orders in book order.

    Rules: node index known, energy a positive whole number of Wh within
    bounds, price on the market's tick within bounds, sequence unique, and
    the book's total energy below 2**52 Wh.
    """
    count = len(request)
    if count == 0:
        return ValidOrders(request, np.zeros(0, dtype=np.int64), None)
    node = np.asarray(request.node_index)
    energy = np.asarray(request.energy_wh)
    price = np.asarray(request.price_micro_per_kwh)
    sequence = np.asarray(request.sequence)
    for name, column in (("node_index", node), ("energy_wh", energy), ("price_micro_per_kwh", price)):
        if not np.issubdtype(column.dtype, np.integer):
            raise OrderError(f"column {name}", f"must hold whole numbers, got dtype {column.dtype}")
    if not np.issubdtype(sequence.dtype, np.integer):
        raise OrderError("column sequence", f"must hold whole numbers, got dtype {sequence.dtype}")
    if np.asarray(request.is_buy).dtype != np.bool_:
        raise OrderError("column is_buy", "must hold booleans")

    node_count = len(grid.nodes)
    bad = (node < 0) | (node >= node_count)
    if bad.any():
        row = int(np.argmax(bad))
        raise OrderError(request.describe_row(row), f"node index {int(node[row])} is not a node of the grid")
    bad = (energy <= 0) | (energy > MAX_ORDER_ENERGY_WH)
    if bad.any():
        row = int(np.argmax(bad))
        rule = (
            "must be positive"
            if energy[row] <= 0
            else f"exceeds the largest order of {MAX_ORDER_ENERGY_WH} Wh"
        )
        raise OrderError(request.describe_row(row), f"energy_wh {int(energy[row])} {rule}")
    tick = grid.price_tick_micro_per_kwh
    level = price // tick
    bad = (level * tick != price) | (np.abs(price) > MAX_ABS_PRICE_MICRO_PER_KWH)
    if bad.any():
        row = int(np.argmax(bad))
        rule = (
            f"is not on the market's tick of {tick} micro per kWh"
            if price[row] % tick
            else f"is beyond ±{MAX_ABS_PRICE_MICRO_PER_KWH} micro per kWh"
        )
        raise OrderError(request.describe_row(row), f"price {int(price[row])} micro per kWh {rule}")
    if float(energy.sum(dtype=np.float64)) >= MAX_BOOK_ENERGY_WH:
        raise OrderError("orders", f"the book's total energy reaches 2**52 Wh ({MAX_BOOK_ENERGY_WH})")

    input_row: IntArray | None = None
    if count > 1 and not bool(np.all(sequence[1:] > sequence[:-1])):
        # Not in book order (e.g. a shuffled file): sort once, then check uniqueness.
        input_row = np.argsort(sequence, kind="stable").astype(np.int64)
        ordered = sequence[input_row]
        repeats = np.flatnonzero(ordered[1:] == ordered[:-1])
        if repeats.size:
            first, second = sorted((int(input_row[repeats[0]]), int(input_row[repeats[0] + 1])))
            raise OrderError(
                request.describe_row(second),
                f"duplicate sequence {int(sequence[second])}: {request.describe_row(first)} has it already",
            )
        request = request.take(input_row)
        level = level[input_row]
    return ValidOrders(request, level.astype(np.int64, copy=False), input_row)


def aggregate(orders: ValidOrders, grid: Grid) -> PriceSteps:
    """Merge orders into steps per (node, side, price level); record each order's step.

    Q_k = sum of energy_wh over the orders of step k (exact: totals stay below 2**52).
    """
    request = orders.request
    node_count = len(grid.nodes)
    tick = grid.price_tick_micro_per_kwh
    count = len(request)
    if count == 0:
        empty = np.zeros(0, dtype=np.int64)
        return PriceSteps(
            empty,
            np.zeros(0, dtype=bool),
            empty,
            empty,
            np.zeros(2 * node_count + 1, dtype=np.int64),
            empty,
            tick,
        )
    level = orders.level
    low = int(level.min())
    span = int(level.max()) - low + 1
    segment = np.asarray(request.node_index, dtype=np.int64) * 2 + request.is_buy
    key = segment * span + (level - low)
    energy = np.asarray(request.energy_wh)
    cells = 2 * node_count * span
    if cells <= max(_DENSE_CELLS_PER_ORDER * count, _DENSE_CELLS_MIN):
        sums = np.bincount(key, weights=energy, minlength=cells)
        step_key = np.flatnonzero(sums)
        compact = np.zeros(cells, dtype=np.int64)
        compact[step_key] = np.arange(len(step_key), dtype=np.int64)
        order_step = compact[key]
        step_energy = sums[step_key].astype(np.int64)
    else:
        step_key, order_step = np.unique(key, return_inverse=True)
        step_energy = np.bincount(order_step, weights=energy, minlength=len(step_key)).astype(np.int64)
    step_segment = step_key // span
    segment_start = np.searchsorted(step_segment, np.arange(2 * node_count + 1), side="left").astype(np.int64)
    return PriceSteps(
        node=step_segment // 2,
        is_buy=(step_segment % 2).astype(bool),
        level=step_key % span + low,
        energy_wh=step_energy,
        segment_start=segment_start,
        order_step=order_step.astype(np.int64, copy=False),
        tick_micro_per_kwh=tick,
    )
