"""Node prices: whole micro-currency per kWh that form a valid equilibrium with the allocation.

Each step bounds its node's price: a fully accepted buy from above (pi <= p),
a rejected buy from below (pi >= p), a partly accepted step on both sides
(pi = p), and the mirror for sells. Prices across nodes must have the form
pi = lambda - PTDF^T mu, with mu_l non-zero only on binding lines and signed
like the line's flow (lambda is the slack node's price).

Where this leaves a choice, the rule is:

- Uncongested (one price fits every node, so no line needs a shadow price,
  even if a line happens to be at its limit): one price everywhere, the
  midpoint of the admissible interval [max of the lower bounds, min of the
  upper bounds], rounded half to even to a whole micro-currency
  (`rules.midpoint_rule`). If only one end is bounded (e.g. a book with buys
  only), the price is that end; with no orders at all it is 0. Examples: no
  crossing -> midway between the best buy and the best sell; everything
  crossing with equal volumes -> midway between the last accepted sell and
  the last accepted buy; with unequal volumes the longer side's marginal
  order sets the price.
- Congested: first the least congestion, min sum_l |mu_l|, so that prices
  differ only as much as the binding lines force; then, keeping that, lambda
  at the midpoint of its admissible range (or its finite end, or 0); then
  each binding line's mu_l in line order at the midpoint of its remaining
  range. Each node's price is then rounded half to even to a whole micro,
  which keeps it inside its node's interval (whose ends are whole ticks).

Usually the nodes with a partly accepted step (a single admissible price)
already determine lambda and every mu: then that solution, if it fits every
other node and every line's direction, is the only candidate, and the rule
chooses it without solving anything. Otherwise the small LPs of the
congested case (lambda and one variable per binding line and direction) are
re-solved by GLOP with changed objectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from services.domain.grid import Grid
from services.matcher.domain.allocation import FLOW_TOLERANCE_WH, ClearingError
from services.matcher.domain.rules import midpoint_rule
from services.matcher.domain.steps import PriceSteps

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

_NO_BOUND = np.iinfo(np.int64).max // 4
# Relative room around values fixed in the sequence of price LPs.
# (GLOP's answers are good to about 1e-6 of the numbers involved; if a later LP
# of the sequence turns infeasible, the room grows.)
_FIX_ROOMS = (1e-6, 1e-4)
# How far (in ticks) pinned prices may miss an interval or a direction (floating-point dust).
_PINNED_TOLERANCE_LEVELS = 1e-6
# GLOP's presolve can misjudge these tiny LPs with nearly fixed rows as infeasible.
_PRICE_LP_PARAMETERS = "use_preprocessing:false"


@dataclass(frozen=True, eq=False)
class NodePrices:
    price_micro_per_kwh: IntArray  # per node
    shadow_price_micro_per_kwh: FloatArray  # mu per line (0 on lines that are not binding)
    system_price_micro_per_kwh: float  # lambda, the slack's price before rounding


def node_bounds(steps: PriceSteps, accepted_wh: IntArray, node_count: int) -> tuple[IntArray, IntArray]:
    """Per node, the admissible price interval [low, high] in ticks that its steps allow (±_NO_BOUND if open)."""
    low = np.full(node_count, -_NO_BOUND, dtype=np.int64)
    high = np.full(node_count, _NO_BOUND, dtype=np.int64)
    if len(steps):
        # A sell with some energy accepted, or a buy not fully accepted, raises
        # the floor; a buy with some energy accepted, or a sell not fully
        # accepted, lowers the ceiling.
        some = accepted_wh > 0
        short = accepted_wh < steps.energy_wh
        is_buy = steps.is_buy
        is_sell = ~is_buy
        raises_floor = (is_buy & short) | (is_sell & some)
        lowers_ceiling = (is_buy & some) | (is_sell & short)
        # Steps are sorted by node: reduce each node's run.
        node_start = steps.segment_start[0:-1:2]
        present = steps.segment_start[2::2] > node_start
        starts = node_start[present]
        low[present] = np.maximum.reduceat(np.where(raises_floor, steps.level, -_NO_BOUND), starts)
        high[present] = np.minimum.reduceat(np.where(lowers_ceiling, steps.level, _NO_BOUND), starts)
    return low, high


def set_prices(
    steps: PriceSteps,
    accepted_wh: IntArray,
    grid: Grid,
    flows_wh: FloatArray,
    binding: BoolArray,
    *,
    lp_node_level: FloatArray | None = None,
    lp_shadow_level: FloatArray | None = None,
) -> NodePrices:
    """Choose the node prices by the documented rule.

    `lp_node_level`/`lp_shadow_level` (the clearing LP's duals, in ticks) are
    a valid equilibrium too; they are the fallback if the sequence of small
    LPs of the congested rule fails numerically.
    """
    node_count = len(grid.nodes)
    tick = steps.tick_micro_per_kwh
    low, high = node_bounds(steps, accepted_wh, node_count)
    bounded_low = low > -_NO_BOUND
    bounded_high = high < _NO_BOUND
    line_count = len(grid.lines)
    binding_lines = np.flatnonzero(binding)
    uniform_low = int(low.max()) if bounded_low.any() else None
    uniform_high = int(high.min()) if bounded_high.any() else None
    uniform_ok = uniform_low is None or uniform_high is None or uniform_low <= uniform_high
    if uniform_ok:
        # A single price satisfies every node: binding lines need no shadow price.
        price = midpoint_rule(
            None if uniform_low is None else uniform_low * tick,
            None if uniform_high is None else uniform_high * tick,
        )
        return NodePrices(
            np.full(node_count, price, dtype=np.int64),
            np.zeros(line_count),
            float(price),
        )
    if not binding_lines.size:
        raise ClearingError("the allocation admits no single price although no line binds")
    pinned = _pinned_prices(grid, low, high, bounded_low, bounded_high, flows_wh, binding_lines, tick)
    if pinned is not None:
        return pinned
    for room in _FIX_ROOMS:
        try:
            return _congested_prices(
                grid, low, high, bounded_low, bounded_high, flows_wh, binding_lines, tick, room=room
            )
        except ClearingError:
            continue
    if lp_node_level is None or lp_shadow_level is None:
        raise ClearingError("no equilibrium prices fit the allocation")
    return _dual_prices(low, high, bounded_low, bounded_high, lp_node_level, lp_shadow_level, binding, tick)


def _dual_prices(
    low: IntArray,
    high: IntArray,
    bounded_low: BoolArray,
    bounded_high: BoolArray,
    node_level: FloatArray,
    shadow_level: FloatArray,
    binding: BoolArray,
    tick: int,
) -> NodePrices:
    """The clearing LP's own duals as prices: an equilibrium, if not the rule's choice among several."""
    mu = np.where(binding, shadow_level, 0.0)
    prices = _round_half_even(node_level * tick)
    prices = np.clip(
        prices, np.where(bounded_low, low * tick, prices), np.where(bounded_high, high * tick, prices)
    )
    return NodePrices(prices.astype(np.int64), mu * tick, float(node_level[0] * tick))


def _pinned_prices(
    grid: Grid,
    low: IntArray,
    high: IntArray,
    bounded_low: BoolArray,
    bounded_high: BoolArray,
    flows_wh: FloatArray,
    binding_lines: IntArray,
    tick: int,
) -> NodePrices | None:
    """The congested rule's prices when the nodes with one admissible price pin lambda and every mu.

    At a vertex of the clearing LP, as many nodes as there are unknowns
    (lambda and one mu per binding line) usually have a partly accepted step,
    so their prices are fixed. If those equations determine the unknowns and
    the solution fits every other node's interval and every line's direction,
    it is the only equilibrium of that form, so every step of the rule
    chooses it. None otherwise (the small LPs decide).
    """
    ptdf = grid.ptdf()
    fixed = bounded_low & bounded_high & (low == high)
    unknowns = 1 + len(binding_lines)
    if int(np.count_nonzero(fixed)) < unknowns:
        return None
    # Node n: lambda - sum_l PTDF[l, n] mu_l = its price.
    rows = np.empty((len(low), unknowns))
    rows[:, 0] = 1.0
    rows[:, 1:] = -ptdf[binding_lines].T
    solution, _, rank, _ = np.linalg.lstsq(rows[fixed], low[fixed].astype(np.float64), rcond=None)
    if rank < unknowns:
        return None
    levels = rows @ solution
    if np.any(np.abs(levels[fixed] - low[fixed]) > _PINNED_TOLERANCE_LEVELS):
        return None
    if np.any(bounded_low & (levels < low - _PINNED_TOLERANCE_LEVELS)) or np.any(
        bounded_high & (levels > high + _PINNED_TOLERANCE_LEVELS)
    ):
        return None
    flows = flows_wh[binding_lines]
    direction = np.where(np.abs(flows) <= FLOW_TOLERANCE_WH, 0.0, np.sign(flows))
    if np.any(direction * solution[1:] < -_PINNED_TOLERANCE_LEVELS):
        return None
    mu = np.zeros(len(grid.lines))
    mu[binding_lines] = [_snap(value) for value in solution[1:].tolist()]
    return _node_prices(ptdf, _snap(float(solution[0])), mu, low, high, bounded_low, bounded_high, tick)


def _node_prices(
    ptdf: FloatArray,
    lambda_value: float,
    mu: FloatArray,
    low: IntArray,
    high: IntArray,
    bounded_low: BoolArray,
    bounded_high: BoolArray,
    tick: int,
) -> NodePrices:
    """Whole-micro node prices from lambda and mu (in ticks)."""
    levels = lambda_value - ptdf.T @ mu
    prices = _round_half_even(levels * tick)
    # Rounding to whole micro keeps a price inside its node's interval of whole ticks;
    # clipping only removes floating-point dust at the ends.
    prices = np.clip(
        prices, np.where(bounded_low, low * tick, prices), np.where(bounded_high, high * tick, prices)
    )
    return NodePrices(prices.astype(np.int64), mu * tick, lambda_value * tick)


def _congested_prices(
    grid: Grid,
    low: IntArray,
    high: IntArray,
    bounded_low: BoolArray,
    bounded_high: BoolArray,
    flows_wh: FloatArray,
    binding_lines: IntArray,
    tick: int,
    *,
    room: float,
) -> NodePrices:
    ptdf = grid.ptdf()
    # Columns: lambda, then for each binding line mu+ (if the line may bind
    # from -> to) and mu- (if it may bind to -> from); a line at zero flow
    # (a zero limit) may bind either way.
    column_line: list[int] = []
    column_sign: list[float] = []
    for line in binding_lines.tolist():
        # Flows within the float tolerance of zero (a zero limit) may bind either way.
        flow = float(flows_wh[line])
        if abs(flow) <= FLOW_TOLERANCE_WH:
            flow = 0.0
        if flow >= 0:
            column_line.append(line)
            column_sign.append(1.0)
        if flow <= 0:
            column_line.append(line)
            column_sign.append(-1.0)
    mu_count = len(column_line)
    lines_of = np.array(column_line, dtype=np.int64)
    signs = np.array(column_sign, dtype=np.float64)
    bounded = np.flatnonzero(bounded_low | bounded_high)
    finite_levels = np.concatenate((low[bounded_low], high[bounded_high])).astype(np.float64)
    reach = float(finite_levels.max() - finite_levels.min()) + 1.0
    # An artificial box on lambda stands for "unbounded"; reaching it means that end is open.
    lambda_box = (float(finite_levels.min()) - 4 * reach - 1.0, float(finite_levels.max()) + 4 * reach + 1.0)

    # One small GLOP model, re-solved with changed objectives and bounds (warm started).
    from ortools.linear_solver import pywraplp  # type: ignore[attr-defined]

    solver = pywraplp.Solver.CreateSolver("GLOP")
    solver.SetSolverSpecificParametersAsString(_PRICE_LP_PARAMETERS)
    infinity = solver.infinity()
    lam = solver.NumVar(lambda_box[0], lambda_box[1], "lambda")
    nu = [solver.NumVar(0.0, infinity, f"nu{c}") for c in range(mu_count)]
    # Node row n: lambda - sum_c PTDF[line_c, n] * sign_c * nu_c within [low_n, high_n].
    # Nodes with the same row (e.g. a feeder's nodes between the same binding
    # lines) share one constraint with the intersection of their intervals.
    coefficients = -(ptdf[lines_of][:, bounded] * signs[:, None]).T
    rows, group = np.unique(np.round(coefficients, 12), axis=0, return_inverse=True)
    group = group.reshape(-1)
    row_low = np.full(len(rows), -np.inf)
    row_high = np.full(len(rows), np.inf)
    np.maximum.at(row_low, group, np.where(bounded_low[bounded], low[bounded], -np.inf).astype(np.float64))
    np.minimum.at(row_high, group, np.where(bounded_high[bounded], high[bounded], np.inf).astype(np.float64))
    for row_from, row_to, row in zip(row_low.tolist(), row_high.tolist(), rows.tolist(), strict=True):
        constraint = solver.RowConstraint(
            row_from if math.isfinite(row_from) else -infinity,
            row_to if math.isfinite(row_to) else infinity,
            "",
        )
        constraint.SetCoefficient(lam, 1.0)
        for variable, value in zip(nu, row, strict=True):
            if value:
                constraint.SetCoefficient(variable, value)
    objective = solver.Objective()

    def optimise(weights: dict[int, float], maximize: bool) -> float:
        """Optimise sum(weights[c] * x_c) over columns (0 is lambda, c > 0 is nu_{c-1}); its value."""
        objective.Clear()
        for column, weight in weights.items():
            objective.SetCoefficient(lam if column == 0 else nu[column - 1], weight)
        objective.SetOptimizationDirection(maximize)
        status = solver.Solve()
        if status != pywraplp.Solver.OPTIMAL:
            raise ClearingError(f"no equilibrium prices fit the allocation (LP status {status})")
        return _snap(float(objective.Value()))

    def fix(variable: Any, value: float, *, at_least: float) -> None:
        # A little room around a fixed value, so that the next LPs stay feasible
        # within GLOP's tolerances.
        width = room * max(1.0, abs(value))
        variable.SetBounds(max(at_least, value - width), value + width)

    # 1. The least congestion: minimise the sum of |mu|.
    everything = {c + 1: 1.0 for c in range(mu_count)}
    least = optimise(everything, maximize=False)
    cap = solver.RowConstraint(-infinity, least + room * max(1.0, least), "least congestion")
    for variable in nu:
        cap.SetCoefficient(variable, 1.0)
    # 2. lambda at the midpoint of its range.
    lambda_low = optimise({0: 1.0}, maximize=False)
    lambda_high = optimise({0: 1.0}, maximize=True)
    lambda_value = _midpoint(
        None if lambda_low <= lambda_box[0] + 1e-6 else lambda_low,
        None if lambda_high >= lambda_box[1] - 1e-6 else lambda_high,
    )
    fix(lam, lambda_value, at_least=-infinity)
    # 3. Each binding line's mu at the midpoint of its range, in line order.
    mu = np.zeros(len(grid.lines))
    for line in binding_lines.tolist():
        columns = {c + 1: float(signs[c]) for c in np.flatnonzero(lines_of == line).tolist()}
        mu_low = optimise(columns, maximize=False)
        mu_high = optimise(columns, maximize=True)
        value = (mu_low + mu_high) / 2
        if len(columns) == 1:
            ((column, sign),) = columns.items()
            fix(nu[column - 1], value * sign, at_least=0.0)
        else:
            slack = room * max(1.0, abs(value))
            fixed = solver.RowConstraint(value - slack, value + slack, "")
            for column, sign in columns.items():
                fixed.SetCoefficient(nu[column - 1], sign)
        mu[line] = value
    return _node_prices(ptdf, lambda_value, mu, low, high, bounded_low, bounded_high, tick)


def _snap(value: float) -> float:
    """A value within 1e-5 of a whole number of ticks is that number (LP dust)."""
    whole = round(value)
    return float(whole) if abs(value - whole) < 1e-5 else value


def _midpoint(low: float | None, high: float | None) -> float:
    if low is not None and high is not None:
        return (low + high) / 2
    if low is not None:
        return low
    if high is not None:
        return high
    return 0.0


def _round_half_even(values: FloatArray) -> IntArray:
    # Values within a billionth of a whole or half micro are snapped first, so
    # floating-point dust cannot flip a rounding.
    snapped = np.where(np.abs(values * 2 - np.rint(values * 2)) < 1e-6, np.rint(values * 2) / 2, values)
    return np.rint(snapped).astype(np.int64)
