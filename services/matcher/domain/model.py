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

Price windows keep the LP small (a million orders make a few hundred
thousand steps, of which only a handful per node are marginal): only steps
whose price lies within a window around each node's expected price are
variables of their own; the steps outside are merged into groups.

1. Estimate where each node's price lies. On a radial feeder, from the
   subtrees' supply curves (`radial_levels`, exact up to a bucket of levels);
   otherwise by a round of the LP with each group priced at its
   volume-weighted mean (an approximation of the book), starting from the
   price at which the whole book's supply and demand cross, and then by
   Newton's method on the nodes' own supply and demand curves with that
   LP's binding lines (`refine_levels`, within a level or two), or, if that
   does not settle, a second such LP round.
2. Certify: groups are priced at their worst case for the expected outcome
   (buys above and sells below a window expected accepted, the others
   rejected: the group's step nearest the window). If every group ends at
   its expected bound, the solution is optimal for the full LP, because each
   grouped step's reduced cost has the sign of the worst one. Otherwise the
   windows of the nodes concerned grow towards where the group's accepted
   volume says the price lies, and the LP is solved again. Windows only grow,
   so this ends; in the worst case every step is a variable of its own.

The estimates only decide how fast this goes, never what the result is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.domain.grid import Grid
from services.matcher.domain import lp
from services.matcher.domain.steps import PriceSteps

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# Half width (in ticks) of the first price window around each node's expected price
# (on a radial feeder the estimate's own precision is used instead, unless told otherwise).
INITIAL_HALF_WIDTH_LEVELS = 4
# Windows after LP estimates are this many times wider (estimates can be a few ticks off).
CERTIFY_WIDTH_FACTOR = 2
# Groups outside a window grow by this factor with the distance from it
# (when estimating, and when certifying, where little detail is needed).
GROUP_GROWTH = 4
CERTIFY_GROUP_GROWTH = 64
# The radial estimate builds node x price-bucket curves with at most this
# many buckets per node (more where the aggregation's dense level table can
# be summed instead of the steps) and this many cells in all.
MAX_CURVE_BUCKETS = 1024
MAX_DENSE_CURVE_BUCKETS = 4096
MAX_DENSE_CURVE_CELLS = 4_000_000
# Buckets of at most this many levels are summed from the aggregation's level table.
_SUMMED_BUCKET_LEVELS = 8
_NO_LEVEL = np.iinfo(np.int64).max // 4
# Refining an LP estimate with the book's own curves (meshed networks): the
# slopes are taken over this many levels on each side, Newton's method stops
# once no price moves by more than the tolerance, and gives up (the LP
# estimates again) after so many steps or changes of the binding lines.
REFINE_SLOPE_LEVELS = 2
REFINE_TOLERANCE_LEVELS = 0.5
# After half the steps, prices circling within this many levels count as settled.
REFINE_CIRCLE_LEVELS = 4
REFINE_MAX_STEPS = 12
REFINE_MAX_LINE_CHANGES = 4
# No price moves by more than this in one step of the method (a trust region).
REFINE_MAX_MOVE_LEVELS = 32
# A line joins the binding ones when its flow exceeds its limit by more than this share.
REFINE_OVERLOAD_SHARE = 1e-4
# Rounds of estimating where the windows belong; then rounds of certifying
# (windows only grow); after the last, every step is a variable of its own.
ESTIMATE_ROUNDS = 2
MAX_WINDOW_ROUNDS = 12
# Tolerances on GLOP's floating-point answers: values are energies in Wh
# (integers at vertices of the radial and single-node LPs), duals prices in ticks.
VALUE_TOLERANCE_WH = 1e-6
DUAL_TOLERANCE_LEVELS = 1e-7


@dataclass(frozen=True, eq=False)
class _Layout:
    """Which step or merged group each LP column stands for."""

    window: IntArray  # step indices that are columns of their own
    group_node: IntArray
    group_is_buy: BoolArray
    group_first: IntArray  # steps [first, last) of each merged group
    group_last: IntArray
    group_level: FloatArray  # the level the group is priced at
    group_energy_wh: IntArray
    group_expected_wh: IntArray  # the bound the group should end at


@dataclass(frozen=True, eq=False)
class StepSolution:
    """An optimal solution of the step LP with its dual prices.

    Steps in `window` have their LP values; every other step belongs to one
    of the groups of `layout` and sits at its group's expected bound (fully
    accepted where `group_expected_wh` > 0, else rejected).
    """

    window_values: FloatArray
    layout: _Layout
    node_level: FloatArray  # pi_n in ticks
    line_shadow_level: FloatArray  # mu_l in ticks
    flows_wh: FloatArray
    rounds: int
    columns: int


def solve_steps(
    steps: PriceSteps,
    grid: Grid,
    limits_wh: FloatArray,
    *,
    initial_half_width: int | None = None,
    initial_levels: FloatArray | None = None,
) -> StepSolution:
    """Solve the step LP to optimality with price windows (see the module docstring).

    `initial_levels` (node prices in ticks, e.g. of a nearby LP) skip the
    estimating rounds. `initial_half_width` is the first windows' half width
    in levels; by default INITIAL_HALF_WIDTH_LEVELS, or on a radial feeder the
    precision of its estimate.
    """
    node_count = len(grid.nodes)
    line_count = len(grid.lines)
    if len(steps) == 0:
        empty = np.zeros(0, dtype=np.int64)
        nothing = _Layout(empty, empty, np.zeros(0, dtype=bool), empty, empty, np.zeros(0), empty, empty)
        return StepSolution(
            np.zeros(0),
            nothing,
            np.full(node_count, np.nan),
            np.zeros(line_count),
            np.zeros(line_count),
            0,
            0,
        )
    level_min = steps.base_level
    level_max = level_min + steps.key_span - 1
    first_width = INITIAL_HALF_WIDTH_LEVELS if initial_half_width is None else initial_half_width
    half_width = np.full(node_count, max(1, first_width), dtype=np.int64)
    rounds = 0
    estimate_rounds = ESTIMATE_ROUNDS
    if initial_levels is None and grid.is_radial:
        radial = radial_levels(steps, grid, limits_wh)
        if radial is not None:
            initial_levels = radial[0]
            # The estimate is good to its bucket, and to the level between a
            # marginal buy and a marginal sell: unless told otherwise, that is the window.
            estimate_width = radial[1] // 2 + 1
            half_width[:] = (
                estimate_width if initial_half_width is None else np.maximum(half_width, estimate_width)
            )
    if initial_levels is not None and np.all(np.isfinite(initial_levels)):
        target = np.clip(np.rint(initial_levels), level_min, level_max).astype(np.int64)
        estimate_rounds = 0
    else:
        target = np.full(node_count, crossing_level(steps), dtype=np.int64)
    # Any reference price works (the balance makes it cancel); one near the prices keeps coefficients small.
    centre = int(np.median(target))
    # Estimate: groups at their volume-weighted price approximate the book, so
    # the LP's prices say where each node's window belongs.
    moved = np.zeros(node_count)
    for _ in range(estimate_rounds):
        rounds += 1
        layout = define_variables(steps, target - half_width, target + half_width, certify=False)
        solution = lp.solve(_program(steps, grid, layout, limits_wh, reference_level=centre))
        estimate = np.clip(centre + solution.duals[:node_count], level_min, level_max)
        moved = np.abs(estimate - target)
        target = np.rint(estimate).astype(np.int64)
        if bool(np.all(moved <= half_width / 2)):
            moved[:] = 0
            break
        # On a meshed network the first LP's binding lines and prices are a
        # good start for Newton's method on the book's own curves, which
        # replaces further estimating rounds when it settles.
        refined = (
            None
            if grid.is_radial or rounds > 1
            else refine_levels(
                steps,
                grid,
                limits_wh,
                centre + solution.duals[:node_count],
                solution.duals[node_count + 1 : node_count + 1 + line_count],
            )
        )
        if refined is not None:
            target = np.clip(np.rint(refined[0]), level_min, level_max).astype(np.int64)
            moved = refined[1]
            break
    # Certify: groups at their worst case; windows only grow until every group
    # ends at its expected bound. A node whose estimate still moved in the last
    # round gets a window as wide as that move.
    certify_width = np.maximum(
        half_width * CERTIFY_WIDTH_FACTOR if estimate_rounds else half_width, np.ceil(moved).astype(np.int64)
    )
    low, high = _reach_steps(steps, target, target - certify_width, target + certify_width)
    certify_rounds = 0
    while True:
        rounds += 1
        certify_rounds += 1
        if certify_rounds > MAX_WINDOW_ROUNDS:
            low[:] = level_min
            high[:] = level_max
        layout = define_variables(steps, low, high, certify=True)
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
        target = np.clip(np.rint(centre + solution.duals[:node_count]), level_min, level_max).astype(np.int64)
        missed = _implied_levels(steps, layout, group_values, off, target)
        half_width[missed] *= 2
        low = np.minimum(low, target - half_width)
        high = np.maximum(high, target + half_width)

    injections = solution.values[window_count + group_count :]
    duals = solution.duals
    node_level = centre + duals[:node_count]
    shadow = duals[node_count + 1 : node_count + 1 + line_count].copy()
    flows = grid.ptdf() @ injections if line_count else np.zeros(0)
    return StepSolution(
        solution.values[:window_count], layout, node_level, shadow, flows, rounds, len(program.lower)
    )


def refine_levels(
    steps: PriceSteps, grid: Grid, limits_wh: FloatArray, node_level: FloatArray, shadow_level: FloatArray
) -> tuple[FloatArray, FloatArray] | None:
    """Node prices (ticks) where the book's own curves balance with the estimate's binding lines at their limits.

    Each node's net injection E_n(p) (supply at or below p minus demand at or
    above p) is made continuous by sweeping the jump at each level linearly
    over the half levels around it. With the lines B that bind in the LP
    estimate, in their directions s_l, prices are pi = lambda - PTDF_B^T mu_B
    and Newton's method solves sum_n E_n(pi_n) = 0 and PTDF_B E(pi) = s L_B
    for lambda and mu_B (slopes averaged over a few levels, the curves being
    steps; no price moves more than a bounded distance per step). A line
    whose mu turns against its direction leaves B; once the prices settle,
    the most overloaded line joins it, until none is. Returns the prices and
    how far each moved in the last step (on sparse curves the method can
    circle within a few levels), or None if that does not settle within a
    few steps (the LP estimates again instead).
    """
    node_count = len(grid.nodes)
    ptdf = grid.ptdf()
    lines = np.flatnonzero(np.abs(shadow_level) > DUAL_TOLERANCE_LEVELS)
    # Prices are v @ rows with v = (lambda, -mu_B) and rows = (1; PTDF_B);
    # the residuals rows @ E(prices) - target have the Jacobian rows diag(slope) rows^T.
    unknowns = np.concatenate(([float(node_level[grid.slack_index])], -shadow_level[lines]))
    rows = np.vstack((np.ones(node_count), ptdf[lines]))
    target = np.concatenate(([0.0], np.sign(shadow_level[lines]) * limits_wh[lines]))
    base = steps.base_level
    span = steps.key_span
    prefix = steps.energy_prefix
    step_key = steps.step_key
    # Keys of each node's sell and buy segment (a level's offset is added).
    segment_key = (2 * np.arange(node_count) + np.array([[0], [1]])) * span
    sell_start = prefix[steps.segment_start[0:-1:2]]
    buy_end = prefix[steps.segment_start[2::2]]
    # Levels k, k + 1 (the jump being swept) and k - h, k + h + 1 (the slope's ends).
    width = REFINE_SLOPE_LEVELS
    offsets = np.array([0, 1, -width, width + 1], dtype=np.int64)[:, None] - base
    least_slope = 1e-9 * max(1.0, float(prefix[-1]))
    changes = 0
    for count in range(REFINE_MAX_STEPS):
        prices = unknowns @ rows
        level = np.floor(prices + 0.5)
        swept = prices + 0.5 - level
        # A(k) = supply below k minus demand at or above k, for each offset and node.
        offset = np.minimum(np.maximum(level.astype(np.int64) + offsets, 0), span)
        counted = prefix[np.searchsorted(step_key, offset[:, None, :] + segment_key)]
        below = ((counted[:, 0] - sell_start) - (buy_end - counted[:, 1])).astype(np.float64)
        injection = below[0] + swept * (below[1] - below[0])
        slope = np.maximum((below[3] - below[2]) * (1.0 / (2 * width + 1)), least_slope)
        try:
            step = np.linalg.solve((rows * slope) @ rows.T, rows @ injection - target)
        except np.linalg.LinAlgError:
            return None
        move = step @ rows
        largest = float(np.abs(move).max())
        if not math.isfinite(largest):
            return None
        if largest > REFINE_MAX_MOVE_LEVELS:
            step *= REFINE_MAX_MOVE_LEVELS / largest
            move *= REFINE_MAX_MOVE_LEVELS / largest
        unknowns -= step
        # mu_l = -v_l must have its line's direction (the sign of target_l).
        against = unknowns[1:] * target[1:]
        if (against > 0).any():
            keep = np.arange(len(unknowns)) != 1 + int(np.argmax(against))
            lines, unknowns, rows, target = lines[keep[1:]], unknowns[keep], rows[keep], target[keep]
        elif largest <= (REFINE_TOLERANCE_LEVELS if 2 * count < REFINE_MAX_STEPS else REFINE_CIRCLE_LEVELS):
            # (A meshed network has lines.)
            flows = ptdf @ injection
            overload = np.abs(flows) - limits_wh * (1 + REFINE_OVERLOAD_SHARE)
            overload[lines] = 0.0
            worst = int(np.argmax(overload))
            if overload[worst] <= 0:
                return unknowns @ rows, np.abs(move)
            lines = np.append(lines, worst)
            unknowns = np.append(unknowns, 0.0)
            rows = np.vstack((rows, ptdf[worst]))
            target = np.append(target, np.sign(flows[worst]) * limits_wh[worst])
        else:
            continue
        changes += 1
        if changes > REFINE_MAX_LINE_CHANGES:
            return None
    return None


def radial_levels(steps: PriceSteps, grid: Grid, limits_wh: FloatArray) -> tuple[FloatArray, int] | None:
    """Node prices (ticks) of a radial network from its subtrees' supply curves: where the windows belong.

    E_n(p) = supply at or below p minus demand at or above p at node n; a
    subtree's curve adds its children's curves clipped to their lines'
    limits. The root's price is where its curve crosses zero; a child keeps
    its parent's price unless its subtree would then push more than its
    line's limit, in which case its price is where the subtree pushes exactly
    the limit. Returns the levels and how many levels each is uncertain by
    (the bucket width); None if the dense curves would be too large.
    """
    node_count = len(grid.nodes)
    base = steps.base_level
    span = steps.key_span
    # The curves live on buckets of price levels: the levels themselves, or
    # ranges of them in a wide book (the estimate then has the bucket's width,
    # which the returned window half width covers).
    # A dense book's level table is at hand: then finer buckets cost little.
    buckets = MAX_CURVE_BUCKETS if steps.key_table is None else MAX_DENSE_CURVE_BUCKETS
    bucket = max(1, -(-span // buckets))
    width = -(-span // bucket)
    if node_count * width > MAX_DENSE_CURVE_CELLS:
        return None
    table: FloatArray
    if steps.key_table is not None and bucket <= _SUMMED_BUCKET_LEVELS:
        # The aggregation's (node, side, level) table, its levels summed into buckets.
        table = _bucket_sums(steps.key_table.reshape(2 * node_count, span), bucket)
    else:
        column = steps.level - base
        if bucket > 1:
            column = column // bucket
        # One pass: a (node, side, bucket) table; steps are sorted that way already.
        offset = (steps.node * 2 + steps.is_buy) * width + column
        sums = np.bincount(
            offset, weights=steps.energy_wh.astype(np.float64), minlength=2 * node_count * width
        )
        table = np.asarray(sums, dtype=np.float64).reshape(2 * node_count, width)
    supply = table[0::2]
    demand = table[1::2]
    # Supply at or below a bucket minus demand at or above it: the running sum
    # of supply up to the bucket and of demand below it, minus all demand.
    # (Whole Wh below 2**52 in float64: every sum is exact.)
    curves = supply.copy()
    curves[:, 1:] += demand[:, :-1]
    np.cumsum(curves, axis=1, out=curves)
    curves -= demand.sum(axis=1, keepdims=True)
    order, entry_line = grid.search_tree()
    ends = [(grid.node_index[line.from_node], grid.node_index[line.to_node]) for line in grid.lines]
    parent = [-1] * node_count
    for node in order[1:]:
        a, b = ends[entry_line[node]]
        parent[node] = a if b == node else b
    limits = limits_wh.tolist()
    clipped = np.empty(width)
    for node in reversed(order[1:]):
        limit = limits[entry_line[node]]
        np.clip(curves[node], -limit, limit, out=clipped)
        curves[parent[node]] += clipped
    # Curves never decrease: the first bucket at or above a value is the number of buckets below it.
    position = [0] * node_count
    root = order[0]
    position[root] = min(int(np.count_nonzero(curves[root] < 0.0)), width - 1)
    for node in order[1:]:
        limit = limits[entry_line[node]]
        at_parent = float(curves[node, position[parent[node]]])
        if at_parent > limit:
            position[node] = min(int(np.count_nonzero(curves[node] < limit)), width - 1)
        elif at_parent < -limit:
            position[node] = min(int(np.count_nonzero(curves[node] < -limit)), width - 1)
        else:
            position[node] = position[parent[node]]
    return (base + np.array(position, dtype=np.int64) * bucket + (bucket - 1) / 2).astype(np.float64), bucket


def _bucket_sums(table: FloatArray, bucket: int) -> FloatArray:
    """Each row's columns summed in runs of `bucket` (the last run may be shorter)."""
    if bucket == 1:
        return table
    rows, span = table.shape
    whole = span // bucket
    sums = np.empty((rows, -(-span // bucket)))
    head = sums[:, :whole]
    np.copyto(head, table[:, 0 : whole * bucket : bucket])
    for first in range(1, bucket):
        head += table[:, first : whole * bucket : bucket]
    if sums.shape[1] > whole:
        sums[:, whole] = table[:, whole * bucket :].sum(axis=1)
    return sums


def crossing_level(steps: PriceSteps) -> int:
    """Where the book's total supply and demand curves cross, ignoring the grid (the first window's centre)."""
    low = steps.base_level
    span = steps.key_span
    offset = steps.level - low
    energy = steps.energy_wh.astype(np.float64)
    supply = np.cumsum(np.bincount(offset[~steps.is_buy], weights=energy[~steps.is_buy], minlength=span))
    demand_from_top = np.cumsum(
        np.bincount(offset[steps.is_buy], weights=energy[steps.is_buy], minlength=span)[::-1]
    )[::-1]
    crossed = np.flatnonzero(supply >= demand_from_top)
    return low + (int(crossed[0]) if crossed.size else span - 1)


def define_variables(steps: PriceSteps, low: IntArray, high: IntArray, *, certify: bool) -> _Layout:
    """Columns: y_k for steps inside their node's window [low_n, high_n]; merged groups outside.

    0 <= y_k <= Q_k; a group has 0 <= y_g <= sum of its Q_k. Outside a
    window of half width w the groups end at 3w, 15w, 63w, ... from it when
    estimating (the book near the window keeps its detail), at 63w, 4095w,
    ... when certifying (where only the bounds matter).
    A group is priced at its worst case for the expected outcome when
    `certify` (buys above and sells below a window expected accepted, the
    others rejected: the step nearest the window), else at its
    volume-weighted mean level (an estimate of the book).
    """
    node_count = len(low)
    base = steps.base_level
    span = steps.key_span
    # Cut levels per node: ... low-15w, low-3w, low | window | high+1, high+1+3w, high+1+15w, ...
    half = np.maximum(1, (high - low) // 2)
    growth = CERTIFY_GROUP_GROWTH if certify else GROUP_GROWTH
    reach = int(np.ceil(np.log(max(2.0, span / float(half.min()))) / np.log(growth))) + 1
    offsets = half[:, None] * (growth ** np.arange(1, reach + 1) - 1)[None, :]
    below = (low[:, None] - offsets)[:, ::-1]
    above = (high[:, None] + 1) + offsets
    cuts = np.concatenate((below, low[:, None], high[:, None] + 1, above), axis=1)
    # A cut at offset `span` is the segment's end (the next segment's first key).
    cuts = np.clip(cuts - base, 0, span)
    window_cut = below.shape[1]  # the window lies between cut columns window_cut and window_cut + 1
    segments = np.arange(2 * node_count)
    bounds = np.searchsorted(steps.step_key, segments[:, None] * span + cuts[segments // 2], side="left")
    start = steps.segment_start[:-1][:, None]
    end = steps.segment_start[1:][:, None]
    edges = np.concatenate((start, np.clip(bounds, start, end), end), axis=1)
    edges = np.maximum.accumulate(edges, axis=1)
    first = edges[:, :-1]
    last = edges[:, 1:]
    is_window = np.zeros(first.shape, dtype=bool)
    is_window[:, window_cut + 1] = True
    window = _ranges(first[:, window_cut + 1], last[:, window_cut + 1])

    energy_prefix = steps.energy_prefix
    group_energy = energy_prefix[last] - energy_prefix[first]
    is_group = (group_energy > 0) & ~is_window
    segment_of = np.broadcast_to(segments[:, None], first.shape)[is_group]
    group_first = first[is_group]
    group_last = last[is_group]
    group_energy = group_energy[is_group]
    below_window = np.arange(first.shape[1])[None, :] <= window_cut
    group_below = np.broadcast_to(below_window, first.shape)[is_group]
    group_is_buy = (segment_of % 2).astype(bool)
    if certify:
        group_level = np.where(group_below, steps.level[group_last - 1], steps.level[group_first]).astype(
            np.float64
        )
    else:
        weighted_prefix = steps.weighted_prefix
        group_level = base + (weighted_prefix[group_last] - weighted_prefix[group_first]) / group_energy
    expected_full = np.where(group_below, ~group_is_buy, group_is_buy)
    return _Layout(
        window=window,
        group_node=segment_of // 2,
        group_is_buy=group_is_buy,
        group_first=group_first,
        group_last=group_last,
        group_level=group_level,
        group_energy_wh=group_energy,
        group_expected_wh=np.where(expected_full, group_energy, 0),
    )


def _reach_steps(
    steps: PriceSteps, target: IntArray, low: IntArray, high: IntArray
) -> tuple[IntArray, IntArray]:
    """Windows [low, high] widened so that each reaches the nearest step of both sides at or below and at or above its target.

    In a sparse book a node's price can lie anywhere between two steps
    several levels apart; a window with no step on one side of it would
    leave the marginal step in a group and cost another round.
    """
    node_count = len(target)
    span = steps.key_span
    segments = np.arange(2 * node_count)
    offset = np.clip(target - steps.base_level, 0, span - 1)[segments // 2]
    key = segments * span + offset
    first = steps.segment_start[:-1]
    last = steps.segment_start[1:]
    below = np.searchsorted(steps.step_key, key, side="right") - 1
    above = np.searchsorted(steps.step_key, key, side="left")
    reach_low = np.where(below >= first, steps.level[np.clip(below, 0, None)], _NO_LEVEL)
    reach_high = np.where(above < last, steps.level[np.clip(above, None, len(steps) - 1)], -_NO_LEVEL)
    low = np.minimum(low, reach_low.reshape(node_count, 2).min(axis=1))
    high = np.maximum(high, reach_high.reshape(node_count, 2).max(axis=1))
    return low, high


def _ranges(first: IntArray, last: IntArray) -> IntArray:
    """The indices of the ranges [first_i, last_i), concatenated."""
    lengths = np.maximum(0, last - first)
    total = int(lengths.sum())
    if not total:
        return np.zeros(0, dtype=np.int64)
    starts = np.cumsum(lengths) - lengths
    indices: IntArray = np.arange(total, dtype=np.int64) - np.repeat(starts - first, lengths)
    return indices


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
    # Line rows: the PTDF's non-zero entries, row by row.
    line_rows, line_nodes = np.nonzero(grid.ptdf())
    column_parts.append(injection_column[line_nodes])
    coefficient_parts.append(grid.ptdf()[line_rows, line_nodes])
    line_ends = offset + np.cumsum(np.bincount(line_rows, minlength=len(grid.lines)))
    row_start_all = np.concatenate((row_start[0], [offset], line_ends)).astype(np.int64)
    row_lower = np.concatenate((np.zeros(node_count + 1), -limits_wh))
    row_upper = np.concatenate((np.zeros(node_count + 1), limits_wh))
    return (
        row_start_all.astype(np.int64),
        np.concatenate(column_parts).astype(np.int64),
        np.concatenate(coefficient_parts).astype(np.float64),
        row_lower.astype(np.float64),
        row_upper.astype(np.float64),
    )


def define_objective(column_level: FloatArray, column_is_buy: BoolArray, reference_level: int) -> FloatArray:
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
    column_level = np.concatenate((steps.level[window].astype(np.float64), layout.group_level))
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


def full_group_energy(steps: PriceSteps, layout: _Layout) -> IntArray:
    """Each step's energy if it lies in a group expected fully accepted, else 0."""
    full = layout.group_expected_wh > 0
    # Groups are disjoint, not empty and in step order: the steps alternate
    # between runs outside them and runs inside them.
    first = layout.group_first[full]
    bounds = np.empty(2 * len(first) + 2, dtype=np.int64)
    bounds[0] = 0
    bounds[1:-1:2] = first
    bounds[2:-1:2] = layout.group_last[full]
    bounds[-1] = len(steps)
    inside = np.repeat(np.resize(np.array([0, 1], dtype=np.int64), len(bounds) - 1), np.diff(bounds))
    inside *= steps.energy_wh
    return inside


def _implied_levels(
    steps: PriceSteps, layout: _Layout, group_values: FloatArray, off: BoolArray, target: IntArray
) -> BoolArray:
    """Set `target` of each node with a missed group to the level that group's volume implies.

    A group's accepted volume v says where the price lies inside it: buys are
    accepted from the highest price down, sells from the lowest up, so the
    price is near the level at which the group's volume from that end reaches v.
    Returns which nodes had a missed group.
    """
    missed = np.zeros(len(target), dtype=bool)
    for group in np.flatnonzero(off):
        first, last = int(layout.group_first[group]), int(layout.group_last[group])
        levels = steps.level[first:last]
        energies = steps.energy_wh[first:last].astype(np.float64)
        if layout.group_is_buy[group]:
            levels, energies = levels[::-1], energies[::-1]
        reached = np.searchsorted(np.cumsum(energies), float(group_values[group]) - VALUE_TOLERANCE_WH)
        node = int(layout.group_node[group])
        target[node] = int(levels[min(int(reached), len(levels) - 1)])
        missed[node] = True
    return missed
