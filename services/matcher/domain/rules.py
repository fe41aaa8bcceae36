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
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from services.domain.grid import ConsistencyError, Grid

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
