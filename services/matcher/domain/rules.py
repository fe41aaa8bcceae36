"""The market's documented rules that both the clearing and the independent check apply.

- `midpoint_rule`: the price of an uncongested market is the midpoint of its
  admissible interval, rounded half to even to a whole micro-currency; the
  finite end if only one end is bounded; 0 with no bound at all.
- `rounding_allowance_wh`: how far below its limit a binding line's flow may
  stay because energy is allocated in whole Wh: 1 Wh on a radial network
  (its flows are whole Wh, its limits are rounded down to whole Wh), and on a
  meshed network 2 x `rounding_margin_wh`.
- `rounding_margin_wh`: (lines + 1) x the line's largest |PTDF| Wh. Rounding
  the at most (lines + 1) fractional steps of an LP vertex moves a line's
  flow by less than this, so an LP solved with every limit lowered by it can
  always be rounded within the true limits.
- `check_limits_allow_rounding`: on a meshed network every line's limit must
  be at least its rounding margin (a loop line with a limit of a few Wh, or
  of zero, cannot be honoured with whole-Wh orders, because loop flows are
  fractions of the injections). Radial networks take any limit, zero included.
- `with_standing_orders`: a grid with a `utility` gets two standing orders at
  the utility's node, first in book order: the utility sells up to its
  transformer's capacity over the interval at the retail tariff
  (order `utility-retail`) and buys as much at the feed-in tariff
  (`utility-feed-in`). The local price then always lies between the two
  tariffs, and a book that crosses completely still has a price set by them.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from services.domain.grid import ConsistencyError, Grid
from services.matcher.domain.orders import ClearingInput, OrderError

UTILITY_RETAIL_ORDER_ID = "utility-retail"
UTILITY_FEED_IN_ORDER_ID = "utility-feed-in"
UTILITY_PARTICIPANT_ID = "utility"

FloatArray = npt.NDArray[np.float64]


def midpoint_rule(low: int | None, high: int | None) -> int:
    """Midpoint of [low, high] rounded half to even; the finite end if one end is open; 0 if both are."""
    if low is not None and high is not None:
        half, odd = divmod(low + high, 2)
        if not odd:
            return half
        # (low + high) / 2 = half + 0.5: round half to even.
        return half if half % 2 == 0 else half + 1
    if low is not None:
        return low
    if high is not None:
        return high
    return 0


def rounding_margin_wh(grid: Grid) -> FloatArray:
    """Per line, (lines + 1) x its largest |PTDF| in Wh (see the module docstring)."""
    if not len(grid.lines):
        return np.zeros(0)
    largest: FloatArray = np.abs(grid.ptdf()).max(axis=1)
    return (len(grid.lines) + 1) * largest


def rounding_allowance_wh(grid: Grid) -> FloatArray:
    """Per line, how far below its limit a binding line may stay: 1 Wh if radial, else 2 x the margin."""
    if not len(grid.lines):
        return np.zeros(0)
    if grid.is_radial:
        return np.ones(len(grid.lines))
    return np.maximum(1.0, 2.0 * rounding_margin_wh(grid))


def check_limits_allow_rounding(grid: Grid) -> None:
    """Raise `ConsistencyError` for a line of a meshed network whose limit is below its rounding margin."""
    if grid.is_radial:
        return
    margins = rounding_margin_wh(grid)
    for index, line in enumerate(grid.lines):
        if grid.line_limits_wh[index] < margins[index]:
            needed_w = int(np.ceil(margins[index] * 60 / grid.interval_minutes))
            raise ConsistencyError(
                f"line {line.id}",
                f"capacity_w {line.capacity_w} is too small for a meshed network: whole-Wh orders need at "
                f"least {needed_w} W here ({margins[index]:.3f} Wh per interval) to be allocated within it",
            )


def with_standing_orders(request: ClearingInput, grid: Grid) -> ClearingInput:
    """The book with the utility's two standing orders in front (unchanged without a utility)."""
    utility = grid.utility
    if utility is None:
        return request
    energy_wh = utility.capacity_w * grid.interval_minutes // 60
    if energy_wh <= 0:
        return request
    for reserved in (UTILITY_RETAIL_ORDER_ID, UTILITY_FEED_IN_ORDER_ID):
        if reserved in request.order_ids:
            raise OrderError(
                f"order {reserved!r}", "this order id is reserved for the utility's standing order"
            )
    first = int(np.min(request.sequence)) if len(request) else 0
    node = grid.node_index[utility.node]
    return ClearingInput(
        order_ids=[UTILITY_RETAIL_ORDER_ID, UTILITY_FEED_IN_ORDER_ID, *request.order_ids],
        participant_ids=[UTILITY_PARTICIPANT_ID, UTILITY_PARTICIPANT_ID, *request.participant_ids],
        node_index=np.concatenate(
            (np.array([node, node], dtype=np.int32), np.asarray(request.node_index, dtype=np.int32))
        ),
        is_buy=np.concatenate((np.array([False, True]), np.asarray(request.is_buy, dtype=bool))),
        energy_wh=np.concatenate(
            (np.array([energy_wh, energy_wh], dtype=np.int64), np.asarray(request.energy_wh))
        ),
        price_micro_per_kwh=np.concatenate(
            (
                np.array(
                    [utility.retail_price_micro_per_kwh, utility.feed_in_price_micro_per_kwh], dtype=np.int64
                ),
                np.asarray(request.price_micro_per_kwh),
            )
        ),
        sequence=np.concatenate(
            (np.array([first - 2, first - 1], dtype=np.int64), np.asarray(request.sequence))
        ),
    )
