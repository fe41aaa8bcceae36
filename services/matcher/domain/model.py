"""The clearing LP over price steps, built in named steps and solved with OR-tools' GLOP.

Variables, constraints and objective (levels are prices in ticks, Wh energies):

    y_k        accepted energy of step k,           0 <= y_k <= Q_k
    inj_n      net injection of node n (free)
    node n:    inj_n - sum_{sell k at n} y_k + sum_{buy k at n} y_k = 0
    balance:   sum_n inj_n = 0
    line l:    -L_l <= sum_n PTDF[l, n] inj_n <= L_l
    maximise   sum_{buy k} (p_k - ref) y_k - sum_{sell k} (p_k - ref) y_k

(subtracting a reference price `ref` changes nothing because buys and sells
balance; it keeps the coefficients small). With duals rho_n of the node rows,
beta of the balance and eta_l of the lines, the node prices are
pi_n = ref + rho_n = lambda - sum_l PTDF[l, n] mu_l with lambda = ref - beta
and mu = eta (positive when a line binds in its from -> to direction).

Price windows keep the LP small: only steps whose price lies within a window
around each node's expected price are variables of their own. The steps below
and above a window are merged into one variable each, priced at the group's
worst case for the expected outcome (buys above and sells below expected
accepted, the others rejected). If every merged variable ends at its expected
bound, the solution is optimal for the full LP (each merged step's reduced
cost has the sign of the worst one). Otherwise the window of that node grows
towards where the merged variable's volume says the price lies, and the LP is
solved again. Windows only grow, so this ends; in the worst case every step
is a variable of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.domain.grid import Grid
from services.matcher.domain import lp
from services.matcher.domain.steps import PriceSteps

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Half width (in ticks) of the first price window around each node's expected price.
INITIAL_HALF_WIDTH_LEVELS = 4
# After this many rounds every step becomes a variable of its own.
MAX_WINDOW_ROUNDS = 12
# Tolerances on GLOP's floating-point answers: values are energies in Wh
# (integers at vertices of the radial and single-node LPs), duals prices in ticks.
VALUE_TOLERANCE_WH = 1e-6
DUAL_TOLERANCE_LEVELS = 1e-7


@dataclass(frozen=True, eq=False)
class StepSolution:
    """An optimal solution of the step LP with its dual prices."""

    accepted_wh: FloatArray  # per step
    node_level: FloatArray  # pi_n in ticks
    line_shadow_level: FloatArray  # mu_l in ticks
    flows_wh: FloatArray
    rounds: int
    columns: int


@dataclass(frozen=True, eq=False)
class _Layout:
    """Which step or merged group each LP column stands for."""

    window: IntArray  # step indices that are columns of their own
    group_node: IntArray
    group_is_buy: BoolArray
    group_first: IntArray  # steps [first, last) of each merged group
    group_last: IntArray
    group_level: IntArray  # worst-case level of the group
    group_energy_wh: IntArray
    group_expected_wh: IntArray  # the bound the group should end at


def solve_steps(
    steps: PriceSteps,
    grid: Grid,
    limits_wh: FloatArray,
    *,
    initial_half_width: int = INITIAL_HALF_WIDTH_LEVELS,
) -> StepSolution:
    """Solve the step LP to optimality with growing price windows (see the module docstring)."""
    node_count = len(grid.nodes)
    line_count = len(grid.lines)
    if len(steps) == 0:
        return StepSolution(
            np.zeros(0), np.full(node_count, np.nan), np.zeros(line_count), np.zeros(line_count), 0, 0
        )
    centre = crossing_level(steps)
    low = np.full(node_count, centre - initial_half_width, dtype=np.int64)
    high = np.full(node_count, centre + initial_half_width, dtype=np.int64)
    half_width = np.full(node_count, initial_half_width, dtype=np.int64)
    level_min, level_max = int(steps.level.min()), int(steps.level.max())
    rounds = 0
    while True:
        rounds += 1
        if rounds > MAX_WINDOW_ROUNDS:
            low[:] = level_min
            high[:] = level_max
        layout = define_variables(steps, low, high)
        program = _program(steps, grid, layout, limits_wh, reference_level=centre)
        solution = lp.solve(program)
        window_count = len(layout.window)
        group_count = len(layout.group_node)
        group_values = solution.values[window_count : window_count + group_count]
        off = np.abs(group_values - layout.group_expected_wh) > (
            VALUE_TOLERANCE_WH + 1e-9 * layout.group_energy_wh
        )
        if not off.any():
            break
        _grow_windows(steps, layout, group_values, off, low, high, half_width)

    accepted = _expand(steps, layout, solution.values[:window_count])
    injections = solution.values[window_count + group_count :]
    duals = solution.duals
    node_level = centre + duals[:node_count]
    shadow = duals[node_count + 1 : node_count + 1 + line_count].copy()
    flows = grid.ptdf() @ injections if line_count else np.zeros(0)
    return StepSolution(accepted, node_level, shadow, flows, rounds, len(program.lower))


def crossing_level(steps: PriceSteps) -> int:
    """Where the book's total supply and demand curves cross, ignoring the grid (the first window's centre)."""
    low = int(steps.level.min())
    span = int(steps.level.max()) - low + 1
    offset = steps.level - low
    supply = np.cumsum(
        np.bincount(offset[~steps.is_buy], weights=steps.energy_wh[~steps.is_buy], minlength=span)
    )
    demand_from_top = np.cumsum(
        np.bincount(offset[steps.is_buy], weights=steps.energy_wh[steps.is_buy], minlength=span)[::-1]
    )[::-1]
    crossed = np.flatnonzero(supply >= demand_from_top)
    return low + (int(crossed[0]) if crossed.size else span - 1)


def define_variables(steps: PriceSteps, low: IntArray, high: IntArray) -> _Layout:
    """Columns: y_k for steps inside their node's window [low_n, high_n]; one merged y per group outside.

    0 <= y_k <= Q_k; a group below or above a window has 0 <= y_g <= sum of its Q_k.
    """
    node_count = len(low)
    segments = np.arange(2 * node_count)
    segment_node = segments // 2
    span_key = steps.level - int(steps.level.min())
    width = int(span_key.max()) + 2
    # Steps are sorted by (segment, level): find each window's first and last step by key.
    key = (steps.node * 2 + steps.is_buy) * width + span_key
    base = int(steps.level.min())
    low_key = segments * width + np.clip(low[segment_node] - base, -1, width - 1)
    high_key = segments * width + np.clip(high[segment_node] - base, -1, width - 1)
    first_in = np.searchsorted(key, low_key, side="left")
    after_in = np.searchsorted(key, high_key, side="right")
    start = steps.segment_start[:-1]
    end = steps.segment_start[1:]
    first_in = np.clip(first_in, start, end)
    after_in = np.clip(after_in, first_in, end)

    in_window = np.zeros(len(steps) + 1, dtype=np.int64)
    np.add.at(in_window, first_in, 1)
    np.add.at(in_window, after_in, -1)
    window = np.flatnonzero(np.cumsum(in_window[:-1]) > 0)

    prefix = np.concatenate(([0], np.cumsum(steps.energy_wh)))
    is_buy_segment = (segments % 2).astype(bool)
    below_energy = prefix[first_in] - prefix[start]
    above_energy = prefix[end] - prefix[after_in]
    below = below_energy > 0
    above = above_energy > 0
    group_node = np.concatenate((segment_node[below], segment_node[above]))
    group_is_buy = np.concatenate((is_buy_segment[below], is_buy_segment[above]))
    group_first = np.concatenate((start[below], after_in[above]))
    group_last = np.concatenate((first_in[below], end[above]))
    # Worst case for the expected outcome: the group's step nearest the window.
    group_level = np.concatenate((steps.level[first_in[below] - 1], steps.level[after_in[above]]))
    group_energy = np.concatenate((below_energy[below], above_energy[above]))
    # Sells below and buys above a window are expected fully accepted, the rest rejected.
    expected_full = np.concatenate((~is_buy_segment[below], is_buy_segment[above]))
    order = np.lexsort((group_first, group_node))
    return _Layout(
        window=window,
        group_node=group_node[order],
        group_is_buy=group_is_buy[order],
        group_first=group_first[order],
        group_last=group_last[order],
        group_level=group_level[order],
        group_energy_wh=group_energy[order],
        group_expected_wh=np.where(expected_full, group_energy, 0)[order],
    )


def define_constraints(
    column_node: IntArray, column_sign: FloatArray, grid: Grid, limits_wh: FloatArray
) -> tuple[IntArray, IntArray, FloatArray, FloatArray, FloatArray]:
    """Rows in CSR form: node balances, the system balance and the line limits.

    node n:  inj_n - sum_{sell at n} y + sum_{buy at n} y = 0
    balance: sum_n inj_n = 0
    line l:  -L_l <= sum_n PTDF[l, n] inj_n <= L_l
    `column_node`/`column_sign` describe the step and group columns
    (sign +1 for sells); the N injection columns follow them.
    """
    node_count = len(grid.nodes)
    step_columns = len(column_node)
    injection_column = step_columns + np.arange(node_count)
    # Node rows: the step columns of each node (coefficient -sign) and its injection column.
    rows = np.concatenate((column_node, np.arange(node_count)))
    columns = np.concatenate((np.arange(step_columns), injection_column))
    coefficients = np.concatenate((-column_sign, np.ones(node_count)))
    order = np.argsort(rows, kind="stable")
    node_counts = np.bincount(rows, minlength=node_count)
    row_start = [np.concatenate(([0], np.cumsum(node_counts)))]
    column_parts = [columns[order]]
    coefficient_parts = [coefficients[order]]
    offset = int(row_start[0][-1])
    # Balance row.
    column_parts.append(injection_column)
    coefficient_parts.append(np.ones(node_count))
    offset += node_count
    starts = [offset]
    # Line rows.
    ptdf = grid.ptdf()
    for line in range(len(grid.lines)):
        nonzero = np.flatnonzero(ptdf[line])
        column_parts.append(injection_column[nonzero])
        coefficient_parts.append(ptdf[line, nonzero])
        offset += len(nonzero)
        starts.append(offset)
    row_start_all = np.concatenate((row_start[0], np.array(starts, dtype=np.int64)))
    row_lower = np.concatenate((np.zeros(node_count + 1), -limits_wh))
    row_upper = np.concatenate((np.zeros(node_count + 1), limits_wh))
    return (
        row_start_all.astype(np.int64),
        np.concatenate(column_parts).astype(np.int64),
        np.concatenate(coefficient_parts).astype(np.float64),
        row_lower.astype(np.float64),
        row_upper.astype(np.float64),
    )


def define_objective(column_level: IntArray, column_is_buy: BoolArray, reference_level: int) -> FloatArray:
    """Welfare per Wh of each step column: (p - ref) for buys, -(p - ref) for sells (in ticks)."""
    relative = (column_level - reference_level).astype(np.float64)
    return np.where(column_is_buy, relative, -relative)


def _program(
    steps: PriceSteps, grid: Grid, layout: _Layout, limits_wh: FloatArray, *, reference_level: int
) -> lp.LinearProgram:
    node_count = len(grid.nodes)
    window = layout.window
    column_node = np.concatenate((steps.node[window], layout.group_node))
    column_is_buy = np.concatenate((steps.is_buy[window], layout.group_is_buy))
    column_level = np.concatenate((steps.level[window], layout.group_level))
    column_energy = np.concatenate((steps.energy_wh[window], layout.group_energy_wh)).astype(np.float64)
    column_sign = np.where(column_is_buy, -1.0, 1.0)
    row_start, columns, coefficients, row_lower, row_upper = define_constraints(
        column_node, column_sign, grid, limits_wh
    )
    objective = np.concatenate(
        (define_objective(column_level, column_is_buy, reference_level), np.zeros(node_count))
    )
    lower = np.concatenate((np.zeros(len(column_node)), np.full(node_count, -np.inf)))
    upper = np.concatenate((column_energy, np.full(node_count, np.inf)))
    return lp.LinearProgram(
        lower, upper, objective, row_start, columns, coefficients, row_lower, row_upper, maximize=True
    )


def _expand(steps: PriceSteps, layout: _Layout, window_values: FloatArray) -> FloatArray:
    """Accepted energy of every step: window steps from the LP, grouped steps at their expected bound."""
    accepted = np.zeros(len(steps), dtype=np.float64)
    marks = np.zeros(len(steps) + 1, dtype=np.int64)
    full = layout.group_expected_wh > 0
    np.add.at(marks, layout.group_first[full], 1)
    np.add.at(marks, layout.group_last[full], -1)
    in_full_group = np.cumsum(marks[:-1]) > 0
    accepted[in_full_group] = steps.energy_wh[in_full_group]
    accepted[layout.window] = window_values
    return accepted


def _grow_windows(
    steps: PriceSteps,
    layout: _Layout,
    group_values: FloatArray,
    off: BoolArray,
    low: IntArray,
    high: IntArray,
    half_width: IntArray,
) -> None:
    """Grow the window of each node whose merged variable missed its bound, towards the price it implies.

    A group's accepted volume v says where the price lies inside it: buys are
    accepted from the highest price down, sells from the lowest up, so the
    price is near the level at which the group's volume from that end reaches v.
    """
    for group in np.flatnonzero(off):
        first, last = int(layout.group_first[group]), int(layout.group_last[group])
        levels = steps.level[first:last]
        energies = steps.energy_wh[first:last].astype(np.float64)
        value = float(group_values[group])
        if layout.group_is_buy[group]:
            levels, energies = levels[::-1], energies[::-1]
        reached = np.searchsorted(np.cumsum(energies), value - VALUE_TOLERANCE_WH, side="left")
        target = int(levels[min(int(reached), len(levels) - 1)])
        node = int(layout.group_node[group])
        width = int(half_width[node])
        low[node] = min(int(low[node]), target - width)
        high[node] = max(int(high[node]), target + width)
        half_width[node] = width * 2
