"""Validation of the clearing input and its aggregation into price steps.

Orders at the same node, on the same side and at the same price are one step
of that node's supply or demand curve: the LP is built over steps, not
orders, and each step is split back to its orders afterwards. Prices lie on
the market's tick, so a step is identified exactly by its price level
(`price_micro_per_kwh // tick`) and the merge loses nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import numpy.typing as npt

from services.domain.grid import Grid
from services.matcher.domain.orders import (
    MAX_ABS_PRICE_MICRO_PER_KWH,
    MAX_BOOK_ENERGY_WH,
    MAX_ORDER_ENERGY_WH,
    ClearingInput,
    OrderError,
    Reordered,
)

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Dense aggregation (a bincount over node x side x price level) is used while
# its table stays within this many cells per order (or 2**18 in all, 2 MB);
# beyond that (very wide price ranges) a sort-based grouping takes over.
_DENSE_CELLS_PER_ORDER = 16
_DENSE_CELLS_MIN = 1 << 18


@dataclass(frozen=True, eq=False)
class ValidOrders:
    """The input in book order (ascending sequence) with each order's price level."""

    request: ClearingInput
    level: npt.NDArray[np.int32] | IntArray  # 32 bits when the price range allows
    # Position of each book-ordered order in the caller's input.
    input_row: IntArray | None
    # The lowest and the highest level (0 and 0 without orders).
    level_low: int = 0
    level_high: int = 0


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
    # Each order's key and each step's key (sorted, unique); in a dense book
    # (key_cells > 0) keys index a table of key_cells cells, otherwise
    # `order_step` holds each order's step.
    order_key: IntArray
    step_key: IntArray
    # Keys are segment * key_span + (level - base_level), segment = 2 * node + is_buy.
    key_span: int
    key_cells: int
    order_step: IntArray | None
    tick_micro_per_kwh: int
    # In a dense book, the energy of every key cell (the steps' energies in
    # float64, exact below 2**52): the (node, side, level) table, reused by
    # the solver instead of summing the steps again.
    key_table: npt.NDArray[np.float64] | None = None

    def __len__(self) -> int:
        return len(self.level)

    def per_order(self, values: npt.NDArray[np.int8]) -> npt.NDArray[np.int8]:
        """A small per-step value (e.g. a state code) looked up for every order."""
        if self.order_step is not None:
            return values[self.order_step]
        table = np.zeros(self.key_cells, dtype=values.dtype)
        table[self.step_key] = values
        # (mode="clip" skips the bounds checks: every key is a cell of the table.)
        return np.take(table, self.order_key, mode="clip")

    def steps_of(self, rows: IntArray) -> IntArray:
        """The step of each order in `rows`."""
        if self.order_step is not None:
            return self.order_step[rows]
        return np.searchsorted(self.step_key, self.order_key[rows]).astype(np.int64)

    def sign_of(self, steps: IntArray) -> npt.NDArray[np.float64]:
        """+1 for sells (energy into the node), -1 for buys, for the given steps."""
        return np.where(self.is_buy[steps], -1.0, 1.0)

    @cached_property
    def base_level(self) -> int:
        return int(self.level.min()) if len(self.level) else 0

    @cached_property
    def energy_prefix(self) -> IntArray:
        """energy_prefix[i] = energy of steps [0, i)."""
        prefix = np.empty(len(self.energy_wh) + 1, dtype=np.int64)
        prefix[0] = 0
        np.cumsum(self.energy_wh, out=prefix[1:])
        return prefix

    @cached_property
    def weighted_prefix(self) -> npt.NDArray[np.float64]:
        """Prefix sums of energy x (level - base_level), for volume-weighted mean levels."""
        weighted = self.energy_wh * (self.level - self.base_level).astype(np.float64)
        return np.concatenate(([0.0], np.cumsum(weighted)))


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

    # Cheap reductions first; the rows are only searched once a rule is broken.
    node_count = len(grid.nodes)
    if int(node.min()) < 0 or int(node.max()) >= node_count:
        row = int(np.argmax((node < 0) | (node >= node_count)))
        raise OrderError(request.describe_row(row), f"node index {int(node[row])} is not a node of the grid")
    if int(energy.min()) <= 0 or int(energy.max()) > MAX_ORDER_ENERGY_WH:
        row = int(np.argmax((energy <= 0) | (energy > MAX_ORDER_ENERGY_WH)))
        rule = (
            "must be positive"
            if energy[row] <= 0
            else f"exceeds the largest order of {MAX_ORDER_ENERGY_WH} Wh"
        )
        raise OrderError(request.describe_row(row), f"energy_wh {int(energy[row])} {rule}")
    price_min, price_max = int(price.min()), int(price.max())
    if price_min < -MAX_ABS_PRICE_MICRO_PER_KWH or price_max > MAX_ABS_PRICE_MICRO_PER_KWH:
        row = int(np.argmax(np.abs(price) > MAX_ABS_PRICE_MICRO_PER_KWH))
        raise OrderError(
            request.describe_row(row),
            f"price {int(price[row])} micro per kWh is beyond ±{MAX_ABS_PRICE_MICRO_PER_KWH} micro per kWh",
        )
    tick = grid.price_tick_micro_per_kwh
    # The floor of the quotient is the level whenever the price is on the tick.
    # Levels fit 32 bits unless prices are huge against the tick; 32-bit keys are cheaper.
    narrow = max(abs(price_min), abs(price_max)) // tick < 2**30
    level: npt.NDArray[np.int32] | IntArray
    if narrow:
        level = np.empty(count, dtype=np.int32)
        np.floor_divide(price, tick, out=level, casting="unsafe")
    else:
        level = np.floor_divide(price, tick, dtype=np.int64)
    # Each price is its level's multiple of the tick plus a remainder in [0, tick):
    # all remainders are 0 exactly when the prices sum to tick x the levels' sum.
    # Both sums wrap around modulo 2**64, which keeps that test exact while
    # count x tick < 2**64.
    if count * tick < 2**64:
        price_sum = int(price.sum(dtype=np.int64))
        level_sum = int(level.sum(dtype=np.int64))
        on_tick = (price_sum - tick * level_sum) % 2**64 == 0
    else:
        on_tick = bool(np.array_equal(np.multiply(level, tick, dtype=np.int64), price))
    if not on_tick:
        row = int(np.argmax(np.multiply(level, tick, dtype=np.int64) != price))
        raise OrderError(
            request.describe_row(row),
            f"price {int(price[row])} micro per kWh is not on the market's tick of {tick} micro per kWh",
        )
    # (The book's total energy is checked when the steps are summed.)

    input_row: IntArray | None = None
    if count > 1 and not bool(np.all(np.greater(sequence[1:], sequence[:-1]))):
        # Not in book order (e.g. a shuffled file): sort once, then check uniqueness.
        # Sequences are unique (checked next), so any sort gives the same order.
        input_row = np.argsort(sequence).astype(np.int64, copy=False)
        ordered = sequence[input_row]
        repeats = np.flatnonzero(ordered[1:] == ordered[:-1])
        if repeats.size:
            first, second = sorted((int(input_row[repeats[0]]), int(input_row[repeats[0] + 1])))
            raise OrderError(
                request.describe_row(second),
                f"duplicate sequence {int(sequence[second])}: {request.describe_row(first)} has it already",
            )
        request = ClearingInput(
            order_ids=Reordered(request.order_ids, input_row),
            participant_ids=Reordered(request.participant_ids, input_row),
            node_index=node[input_row],
            is_buy=np.asarray(request.is_buy)[input_row],
            energy_wh=energy[input_row],
            price_micro_per_kwh=price[input_row],
            sequence=ordered,
        )
        level = level[input_row]
    # Floors keep order: the levels' extremes are those of the prices.
    return ValidOrders(request, level, input_row, price_min // tick, price_max // tick)


def aggregate(orders: ValidOrders, grid: Grid) -> PriceSteps:
    """Merge orders into steps per (node, side, price level) and remember which step each order is in.

    Q_k = sum of energy_wh over the orders of step k (exact: totals stay below 2**52).
    Each order gets a key (node, side, level) that sorts like the steps; in a
    dense book the keys index a table, so the step of every order is one lookup.
    """
    request = orders.request
    node_count = len(grid.nodes)
    tick = grid.price_tick_micro_per_kwh
    count = len(request)
    empty = np.zeros(0, dtype=np.int64)
    if count == 0:
        return PriceSteps(
            empty,
            np.zeros(0, dtype=bool),
            empty,
            empty,
            np.zeros(2 * node_count + 1, dtype=np.int64),
            empty,
            empty,
            1,
            0,
            None,
            tick,
        )
    level = orders.level
    low = orders.level_low
    span = orders.level_high - low + 1
    cells = 2 * node_count * span
    # key = (2 * node + is_buy) * span + (level - low), computed in place, in
    # 32 bits while every partial sum fits (32-bit levels below 2**30 and keys
    # below 2**30), then widened once: bincount and fancy indexing convert
    # narrower indices first, which costs more than the narrower arithmetic saves.
    key_dtype = np.int32 if level.dtype == np.int32 and cells < 2**30 else np.int64
    key = np.multiply(request.node_index, 2, dtype=key_dtype)
    key += request.is_buy
    key *= span
    key += level
    key -= low
    order_key: IntArray = key.astype(np.int64, copy=False)
    energy = np.asarray(request.energy_wh)
    order_step: IntArray | None = None
    key_table: npt.NDArray[np.float64] | None = None
    if cells <= max(_DENSE_CELLS_PER_ORDER * count, _DENSE_CELLS_MIN):
        # Float weights given directly: bincount's own conversion of integers is slow.
        sums = np.bincount(order_key, weights=energy.astype(np.float64), minlength=cells)
        step_key = np.flatnonzero(sums > 0)
        step_energy = np.take(sums, step_key, mode="clip").astype(np.int64)
        key_table = np.asarray(sums, dtype=np.float64)  # (a no-op: weighted counts are floats)
    else:
        step_key, inverse = np.unique(order_key, return_inverse=True)
        order_step = inverse.astype(np.int64, copy=False)
        step_energy = np.bincount(
            order_step, weights=energy.astype(np.float64), minlength=len(step_key)
        ).astype(np.int64)
        cells = 0
    if float(step_energy.sum(dtype=np.float64)) >= MAX_BOOK_ENERGY_WH:
        raise OrderError("orders", f"the book's total energy reaches 2**52 Wh ({MAX_BOOK_ENERGY_WH})")
    # Steps are sorted by key: each (node, side) segment is one run; no divisions needed.
    segment_start = np.searchsorted(step_key, np.arange(2 * node_count + 1, dtype=np.int64) * span).astype(
        np.int64
    )
    runs = np.diff(segment_start)
    segment_key = np.arange(2 * node_count, dtype=np.int64) * span
    return PriceSteps(
        node=np.repeat(np.arange(node_count, dtype=np.int64), runs[0::2] + runs[1::2]),
        is_buy=np.repeat(np.tile(np.array([False, True]), node_count), runs),
        level=step_key - np.repeat(segment_key - low, runs),
        energy_wh=step_energy,
        segment_start=segment_start,
        order_key=order_key,
        step_key=step_key.astype(np.int64, copy=False),
        key_span=span,
        key_cells=cells,
        order_step=order_step,
        tick_micro_per_kwh=tick,
        key_table=key_table,
    )
