"""From the LP's optimum to whole watt-hours: the volume rule for ties and the integer rounding.

Welfare-maximising allocations are often not unique (e.g. when buys and sells
meet at one price). The rule: among them, take the one with the most traded
energy, as power exchanges do. Only *marginal* steps can change without
changing welfare: those priced exactly at their node's price. Every other
step is fully accepted or rejected by every optimum. So the LP's optimum is
refined by a small LP over the marginal steps alone:

    maximise   sum_{marginal buy j} z_j
    subject to 0 <= z_j <= Q_j, the energy balance, |flow_l| <= L_l,
               and flow_l = +-L_l on every line with a non-zero shadow price

(the last rows keep welfare at its optimum). When the balance and the
lines held at their limits already determine each node's net marginal
energy (as many independent equations as nodes with marginal steps, typical
at a vertex of a congested meshed network), only a node's own marginal buy
and sell can grow together, and the answer is written down instead.

Integer energy: the step LP on a single node or a radial feeder has a totally
unimodular matrix (each line's flow is the net injection of a subtree), so
with the line limits rounded down to whole Wh (flows of whole-Wh injections
are whole Wh there anyway) its vertices are integral and nothing is lost. On
a meshed network flows are fractions of the injections; the few fractional
marginal steps are rounded by trying every floor/ceiling pattern that keeps
the balance (the best one within the limits by welfare, then volume); if none
fits, the LP is solved again with the limits lowered a little, then by the
full rounding margin, within which a balanced floor/ceiling rounding always
fits (see `rules`). Only marginal steps move in any of these, so the node
prices of the LP stay a valid equilibrium.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.domain.grid import Grid
from services.matcher.domain import lp
from services.matcher.domain.model import (
    DUAL_TOLERANCE_LEVELS,
    VALUE_TOLERANCE_WH,
    StepSolution,
    full_group_energy,
    solve_steps,
)
from services.matcher.domain.rules import rounding_allowance_wh, rounding_margin_wh
from services.matcher.domain.steps import PriceSteps

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# A flow is within its limit if it exceeds it by no more than this (float PTDFs on loops).
FLOW_TOLERANCE_WH = 1e-6
# Floor/ceiling patterns are enumerated for at most this many fractional steps.
MAX_ENUMERATED_STEPS = 12


class ClearingError(RuntimeError):
    """The clearing could not produce a valid result (a defect, never a property of the input)."""


@dataclass(frozen=True, eq=False)
class Allocation:
    """Whole-Wh accepted energy per step and the resulting line flows."""

    accepted_wh: IntArray
    flows_wh: FloatArray
    # Lines at their limit in the optimum (the only ones that may carry a shadow price).
    binding: BoolArray
    # The limits the LP used: floor(L) on radial networks, L minus a margin after tightening.
    limits_wh: FloatArray
    rounding: str
    solution: StepSolution


def allocate(steps: PriceSteps, grid: Grid, *, initial_half_width: int | None = None) -> Allocation:
    """Solve the step LP, apply the volume rule and round to whole Wh within every line limit.

    A meshed grid must have passed `rules.check_limits_allow_rounding`.
    """
    true_limits = np.asarray(grid.line_limits_wh, dtype=np.float64)
    allowance = rounding_allowance_wh(grid)
    if grid.is_radial:
        limits = np.floor(true_limits + FLOW_TOLERANCE_WH)
        solution = solve_steps(steps, grid, limits, initial_half_width=initial_half_width)
        allocation = _integer_allocation(
            steps, grid, solution, limits, true_limits, allowance, tightened=False
        )
        if allocation is None:
            raise ClearingError("the radial network's LP vertex was not whole (numerical trouble)")
        return allocation
    solution = solve_steps(steps, grid, true_limits, initial_half_width=initial_half_width)
    allocation = _integer_allocation(
        steps, grid, solution, true_limits, true_limits, allowance, tightened=False
    )
    if allocation is not None:
        return allocation
    # Lower the limits a little (by what rounding the LP's fractional steps can
    # move), then by the full rounding margin, within which a balanced
    # floor/ceiling rounding always fits (see `rules`).
    largest = np.abs(grid.ptdf()).max(axis=1)
    shadowed = int(np.count_nonzero(np.abs(solution.line_shadow_level) > DUAL_TOLERANCE_LEVELS))
    margin = rounding_margin_wh(grid)
    for lowered in (np.minimum(margin, (2 + shadowed) * largest), margin):
        limits = np.maximum(0.0, true_limits - lowered)
        solution = solve_steps(
            steps, grid, limits, initial_half_width=initial_half_width, initial_levels=solution.node_level
        )
        allocation = _integer_allocation(
            steps, grid, solution, limits, true_limits, allowance, tightened=True
        )
        if allocation is not None:
            return allocation
    raise ClearingError("no whole-Wh allocation within the line limits was found (numerical trouble)")


def _integer_allocation(
    steps: PriceSteps,
    grid: Grid,
    solution: StepSolution,
    limits: FloatArray,
    true_limits: FloatArray,
    allowance: FloatArray,
    *,
    tightened: bool,
) -> Allocation | None:
    ptdf = grid.ptdf()
    node_count = len(grid.nodes)
    line_count = len(grid.lines)
    energy = steps.energy_wh
    if len(steps) == 0:
        return Allocation(
            np.zeros(0, dtype=np.int64),
            np.zeros(line_count),
            np.zeros(line_count, dtype=bool),
            limits,
            "exact",
            solution,
        )
    layout = solution.layout
    window = layout.window
    values = solution.window_values
    # Marginal steps (priced at their node's price) can only be window steps
    # or a group's step nearest the window; every other step is fully
    # accepted or rejected by any optimum.
    nearest = np.where(
        layout.group_expected_wh > 0,
        np.where(steps.is_buy[layout.group_first], layout.group_first, layout.group_last - 1),
        np.where(steps.is_buy[layout.group_first], layout.group_last - 1, layout.group_first),
    )
    candidates = np.concatenate((window, nearest))
    # A group's nearest step sits at the group's bound: its Q if the group is accepted.
    candidate_values = np.concatenate((values, np.where(layout.group_expected_wh > 0, energy[nearest], 0.0)))
    marginal_mask = (
        np.abs(steps.level[candidates] - solution.node_level[steps.node[candidates]])
        <= DUAL_TOLERANCE_LEVELS * 10
    )
    rounded = np.rint(values)
    window_energy = energy[window]
    at_bound = (np.abs(rounded - values) <= VALUE_TOLERANCE_WH + 1e-9 * window_energy) & (
        (rounded == 0) | (rounded == window_energy)
    )
    if not np.all(at_bound | marginal_mask[: len(window)]):
        raise ClearingError("a step priced away from its node's price is partly accepted (not an LP optimum)")
    accepted = full_group_energy(steps, layout)
    accepted[window] = rounded.astype(np.int64)
    marginal_steps = candidates[marginal_mask]
    marginal_sign = steps.sign_of(marginal_steps)
    z = candidate_values[marginal_mask]
    accepted[marginal_steps] = 0
    # Injections of everything but the marginal steps: groups at their bounds,
    # the window's other steps, minus what the marginal steps had put in.
    group_sign = np.where(layout.group_is_buy, -1.0, 1.0)
    fixed_injection: FloatArray = (
        np.bincount(layout.group_node, weights=group_sign * layout.group_expected_wh, minlength=node_count)
        + np.bincount(steps.node[window], weights=steps.sign_of(window) * rounded, minlength=node_count)
        - np.bincount(
            steps.node[marginal_steps],
            weights=marginal_sign * np.rint(z),
            minlength=node_count,
        )
    ).astype(np.float64)
    shadow = solution.line_shadow_level
    binding_direction = np.where(np.abs(shadow) > DUAL_TOLERANCE_LEVELS, np.sign(shadow), 0.0)
    # More volume needs a marginal buy and a marginal sell that both have room,
    # and an optimal face that is more than the LP's one point.
    room = energy[marginal_steps] - z > VALUE_TOLERANCE_WH
    marginal_buys = steps.is_buy[marginal_steps]
    if (room & marginal_buys).any() and (room & ~marginal_buys).any():
        pinned = _volume_on_a_pinned_face(steps, grid, marginal_steps, binding_direction, z)
        z = (
            _most_volume(steps, grid, marginal_steps, fixed_injection, limits, binding_direction, fallback=z)
            if pinned is None
            else pinned
        )

    injection = fixed_injection + np.bincount(
        steps.node[marginal_steps], weights=marginal_sign * z, minlength=node_count
    )
    continuous_flows = ptdf @ injection if line_count else np.zeros(0)
    binding = (np.abs(continuous_flows) >= limits - 1e-6 * np.maximum(1.0, limits)) | (binding_direction != 0)
    problem = _Rounding(steps, grid, marginal_steps, fixed_injection, true_limits, allowance, binding)

    rounded = np.rint(z)
    fractional = np.abs(z - rounded) > VALUE_TOLERANCE_WH + 1e-9 * energy[marginal_steps]
    candidate: IntArray | None = None
    method = "exact"
    if not fractional.any():
        candidate = problem.accept(rounded.astype(np.int64))
    if candidate is None and fractional.sum() <= MAX_ENUMERATED_STEPS:
        candidate = problem.enumerate(z)
        method = "enumerated"
    if candidate is None and tightened:
        candidate = problem.accept(problem.balanced_rounding(z))
        method = "balanced rounding"
    if candidate is None:
        return None
    accepted[marginal_steps] = candidate
    final_injection = fixed_injection + np.bincount(
        steps.node[marginal_steps], weights=marginal_sign * candidate, minlength=node_count
    )
    flows = ptdf @ final_injection if line_count else np.zeros(0)
    if tightened:
        method = f"tightened, {method}"
    return Allocation(accepted, flows, binding, limits, method, solution)


def _volume_on_a_pinned_face(
    steps: PriceSteps, grid: Grid, marginal_steps: IntArray, binding_direction: FloatArray, z: FloatArray
) -> FloatArray | None:
    """The volume rule's answer when the balance and the held lines fix every node's net marginal energy.

    Every optimum keeps the balance and the lines with a shadow price at their
    limits. If those equations determine the net injection of each node with
    marginal steps, only a node's own marginal buy and sell can still grow
    together (at most one of each per node, both at its price): the most
    volume is the buy at min(Q_buy, Q_sell - net), the sell at buy + net.
    None if the nets are not determined (the LP decides).
    """
    nodes, position = np.unique(steps.node[marginal_steps], return_inverse=True)
    held = binding_direction != 0
    if len(nodes) > 1 + int(np.count_nonzero(held)):
        return None
    if np.linalg.matrix_rank(np.vstack((np.ones(len(nodes)), grid.ptdf()[held][:, nodes]))) < len(nodes):
        return None
    is_buy = steps.is_buy[marginal_steps]
    energy = steps.energy_wh[marginal_steps].astype(np.float64)
    net = np.bincount(position, weights=np.where(is_buy, -z, z), minlength=len(nodes))
    buy_energy = np.bincount(position, weights=np.where(is_buy, energy, 0.0), minlength=len(nodes))
    sell_energy = np.bincount(position, weights=np.where(is_buy, 0.0, energy), minlength=len(nodes))
    # A node with two marginal steps has one of each side.
    paired = np.bincount(position, minlength=len(nodes)) == 2
    bought = np.minimum(buy_energy, sell_energy - net)
    return np.where(paired[position], np.where(is_buy, bought[position], bought[position] + net[position]), z)


def _most_volume(
    steps: PriceSteps,
    grid: Grid,
    marginal_steps: IntArray,
    fixed_injection: FloatArray,
    limits: FloatArray,
    binding_direction: FloatArray,
    *,
    fallback: FloatArray,
) -> FloatArray:
    """The volume rule: most traded energy over the optimal face (see the module docstring)."""
    ptdf = grid.ptdf()
    sign = steps.sign_of(marginal_steps)
    count = len(marginal_steps)
    fixed_flows = ptdf @ fixed_injection if len(grid.lines) else np.zeros(0)
    node_of = steps.node[marginal_steps]
    # Rows: the balance, then every line (its flow from the marginal steps).
    effect = ptdf[:, node_of] * sign
    line_rows, line_columns = np.nonzero(effect)
    total = -float(fixed_injection.sum())
    line_lower = -limits - fixed_flows
    line_upper = limits - fixed_flows
    binding = binding_direction != 0
    # Lines with a shadow price stay at their limit, so welfare stays optimal.
    at_limit = binding_direction * limits - fixed_flows
    line_lower = np.where(binding, at_limit, line_lower)
    line_upper = np.where(binding, at_limit, line_upper)
    program = lp.LinearProgram(
        lower=np.zeros(count),
        upper=steps.energy_wh[marginal_steps].astype(np.float64),
        objective=steps.is_buy[marginal_steps].astype(np.float64),
        row_start=np.concatenate(
            ([0, count], count + np.cumsum(np.bincount(line_rows, minlength=len(grid.lines))))
        ).astype(np.int64),
        column=np.concatenate((np.arange(count), line_columns)).astype(np.int64),
        coefficient=np.concatenate((sign, effect[line_rows, line_columns])).astype(np.float64),
        row_lower=np.concatenate(([total], line_lower)).astype(np.float64),
        row_upper=np.concatenate(([total], line_upper)).astype(np.float64),
        maximize=True,
    )
    try:
        return lp.solve(program).values
    except lp.SolverError:
        # Equalities at the limit can be a hair infeasible in floating point; the
        # LP's own optimum is then kept (it is optimal, only maybe not the most volume).
        return fallback


@dataclass(frozen=True, eq=False)
class _Rounding:
    """Whole-Wh values for the marginal steps: balanced, within every limit, binding lines near theirs."""

    steps: PriceSteps
    grid: Grid
    marginal_steps: IntArray
    fixed_injection: FloatArray
    true_limits: FloatArray
    allowance: FloatArray
    binding: BoolArray

    def flows(self, values: npt.NDArray[np.float64] | IntArray) -> FloatArray:
        sign = self.steps.sign_of(self.marginal_steps)
        injection = self.fixed_injection + np.bincount(
            self.steps.node[self.marginal_steps], weights=sign * values, minlength=len(self.grid.nodes)
        )
        return self.grid.ptdf() @ injection

    def acceptable_flows(self, flows: FloatArray) -> npt.NDArray[np.bool_]:
        """Flows (one row per candidate) within every limit and, on binding lines, within the allowance."""
        magnitude = np.abs(flows)
        within = np.all(magnitude <= self.true_limits + FLOW_TOLERANCE_WH, axis=-1)
        near = np.all(
            ~self.binding | (magnitude >= self.true_limits - self.allowance - FLOW_TOLERANCE_WH), axis=-1
        )
        return np.asarray(within & near)

    def accept(self, values: IntArray | None) -> IntArray | None:
        if values is None:
            return None
        sign = self.steps.sign_of(self.marginal_steps).astype(np.int64)
        if round(float(self.fixed_injection.sum())) + int(np.dot(sign, values)) != 0:
            return None
        if len(self.grid.lines) and not bool(self.acceptable_flows(self.flows(values))):
            return None
        return values

    def _floor_base(self, z: FloatArray) -> tuple[IntArray, IntArray, int]:
        """Floors of the fractional values (others rounded), their indices, and the balance still missing."""
        energy = self.steps.energy_wh[self.marginal_steps]
        rounded = np.rint(z)
        fractional = np.flatnonzero(np.abs(z - rounded) > VALUE_TOLERANCE_WH + 1e-9 * energy)
        base = rounded.copy()
        base[fractional] = np.floor(z[fractional])
        base_int = np.clip(base, 0, energy).astype(np.int64)
        sign = self.steps.sign_of(self.marginal_steps).astype(np.int64)
        needed = -round(float(self.fixed_injection.sum())) - int(np.dot(sign, base_int))
        return base_int, fractional, needed

    def enumerate(self, z: FloatArray) -> IntArray | None:
        """Every floor/ceiling pattern of the fractional steps that keeps the balance: the best acceptable one."""
        base, fractional, needed = self._floor_base(z)
        energy = self.steps.energy_wh[self.marginal_steps]
        sign = self.steps.sign_of(self.marginal_steps).astype(np.int64)
        patterns = np.array(list(itertools.product((0, 1), repeat=len(fractional))), dtype=np.int64).reshape(
            -1, len(fractional)
        )
        room = (energy[fractional] - base[fractional]) >= 1
        patterns = patterns[np.all(patterns <= room, axis=1)]
        patterns = patterns[patterns @ sign[fractional] == needed]
        if not len(patterns):
            return None
        if len(self.grid.lines):
            node_of = self.steps.node[self.marginal_steps]
            effect = self.grid.ptdf()[:, node_of[fractional]] * sign[fractional]
            flows = self.flows(base)[None, :] + patterns @ effect.T
            patterns = patterns[self.acceptable_flows(flows)]
            if not len(patterns):
                return None
        levels = self.steps.level[self.marginal_steps][fractional]
        is_buy = self.steps.is_buy[self.marginal_steps][fractional]
        welfare = patterns @ np.where(is_buy, levels, -levels)
        volume = patterns @ is_buy.astype(np.int64)
        best = int(np.lexsort((-volume, -welfare))[0])
        result = base.copy()
        result[fractional] += patterns[best]
        return result

    def balanced_rounding(self, z: FloatArray) -> IntArray | None:
        """Floors, then ceilings for the largest fractions on the side the balance needs."""
        base, fractional, needed = self._floor_base(z)
        if needed == 0:
            return base
        sign = self.steps.sign_of(self.marginal_steps)
        side = fractional[sign[fractional] == (1.0 if needed > 0 else -1.0)]
        if len(side) < abs(needed):
            return None
        largest = side[np.lexsort((side, -(z[side] - base[side])))][: abs(needed)]
        result = base.copy()
        result[largest] += 1
        return result
