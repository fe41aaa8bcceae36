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

(the last rows keep welfare at its optimum).

Integer energy: the step LP on a single node or a radial feeder has a totally
unimodular matrix (each line's flow is the net injection of a subtree), so
with the line limits rounded down to whole Wh (flows of whole-Wh injections
are whole Wh there anyway) its vertices are integral and nothing is lost. On
a meshed network flows are fractions of the injections; the few fractional
marginal steps are rounded by trying every floor/ceiling pattern that keeps
the balance (the best feasible one by welfare, then volume), else by a small
integer program over the marginal steps (SCIP), else the line limits are
tightened by a rounding margin and the LP solved again. Only marginal steps
move in any of these, so the node prices of the LP stay a valid equilibrium.
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
    INITIAL_HALF_WIDTH_LEVELS,
    VALUE_TOLERANCE_WH,
    StepSolution,
    solve_steps,
)
from services.matcher.domain.rules import (
    check_limits_allow_rounding,
    rounding_allowance_wh,
    rounding_margin_wh,
)
from services.matcher.domain.steps import PriceSteps

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

# A flow is within its limit if it exceeds it by no more than this (float PTDFs on loops).
FLOW_TOLERANCE_WH = 1e-6
# Floor/ceiling patterns are enumerated for at most this many fractional steps.
MAX_ENUMERATED_STEPS = 12
MIP_TIME_LIMIT_S = 5.0


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


def allocate(
    steps: PriceSteps, grid: Grid, *, initial_half_width: int = INITIAL_HALF_WIDTH_LEVELS
) -> Allocation:
    """Solve the step LP, apply the volume rule and round to whole Wh within every line limit."""
    true_limits = np.asarray(grid.line_limits_wh, dtype=np.float64)
    allowance = rounding_allowance_wh(grid)
    if grid.is_radial:
        attempts = [np.floor(true_limits + FLOW_TOLERANCE_WH)]
    else:
        check_limits_allow_rounding(grid)
        # First the true limits; then limits lowered by the rounding margin, within
        # which a balanced floor/ceiling rounding always fits (see `rules`).
        attempts = [true_limits, np.maximum(0.0, true_limits - rounding_margin_wh(grid))]
    for attempt, limits in enumerate(attempts):
        solution = solve_steps(steps, grid, limits, initial_half_width=initial_half_width)
        allocation = _integer_allocation(
            steps, grid, solution, limits, true_limits, allowance, tightened=attempt > 0
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
    sign = steps.sign
    if len(steps) == 0:
        return Allocation(
            np.zeros(0, dtype=np.int64),
            np.zeros(line_count),
            np.zeros(line_count, dtype=bool),
            limits,
            "exact",
            solution,
        )
    marginal = np.abs(steps.level - solution.node_level[steps.node]) <= DUAL_TOLERANCE_LEVELS * 10
    values = solution.accepted_wh
    fixed = ~marginal
    fixed_values = np.rint(values[fixed])
    tolerance = VALUE_TOLERANCE_WH + 1e-9 * energy[fixed]
    at_bound = (np.abs(fixed_values - values[fixed]) <= tolerance) & (
        (fixed_values == 0) | (fixed_values == energy[fixed])
    )
    if not at_bound.all():
        raise ClearingError("a step priced away from its node's price is partly accepted (not an LP optimum)")
    accepted = np.zeros(len(steps), dtype=np.int64)
    accepted[fixed] = fixed_values.astype(np.int64)

    marginal_steps = np.flatnonzero(marginal)
    fixed_injection: FloatArray = np.bincount(
        steps.node, weights=sign * accepted, minlength=node_count
    ).astype(np.float64)
    shadow = solution.line_shadow_level
    binding_direction = np.where(np.abs(shadow) > DUAL_TOLERANCE_LEVELS, np.sign(shadow), 0.0)
    z = values[marginal_steps]
    marginal_buys = steps.is_buy[marginal_steps]
    if marginal_buys.any() and (~marginal_buys).any():
        z = _most_volume(steps, grid, marginal_steps, fixed_injection, limits, binding_direction, fallback=z)

    injection = fixed_injection + np.bincount(
        steps.node[marginal_steps], weights=sign[marginal_steps] * z, minlength=node_count
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
        candidate = problem.integer_program(continuous_flows)
        method = "integer program"
    if candidate is None:
        return None
    accepted[marginal_steps] = candidate
    final_injection = np.bincount(steps.node, weights=sign * accepted, minlength=node_count)
    flows = ptdf @ final_injection if line_count else np.zeros(0)
    if tightened:
        method = f"tightened, {method}"
    return Allocation(accepted, flows, binding, limits, method, solution)


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
    sign = steps.sign[marginal_steps]
    count = len(marginal_steps)
    fixed_flows = ptdf @ fixed_injection if len(grid.lines) else np.zeros(0)
    # Rows: balance, then every line with a non-zero column.
    rows_columns: list[IntArray] = [np.arange(count)]
    rows_coefficients: list[FloatArray] = [sign]
    row_lower = [-float(fixed_injection.sum())]
    row_upper = [-float(fixed_injection.sum())]
    node_of = steps.node[marginal_steps]
    for line in range(len(grid.lines)):
        coefficients = ptdf[line, node_of] * sign
        nonzero = np.flatnonzero(coefficients)
        if binding_direction[line] != 0:
            target = binding_direction[line] * limits[line] - fixed_flows[line]
            lower, upper = target, target
        else:
            lower, upper = -limits[line] - fixed_flows[line], limits[line] - fixed_flows[line]
        rows_columns.append(nonzero)
        rows_coefficients.append(coefficients[nonzero])
        row_lower.append(lower)
        row_upper.append(upper)
    program = lp.LinearProgram(
        lower=np.zeros(count),
        upper=steps.energy_wh[marginal_steps].astype(np.float64),
        objective=steps.is_buy[marginal_steps].astype(np.float64),
        row_start=np.concatenate(([0], np.cumsum([len(c) for c in rows_columns]))).astype(np.int64),
        column=np.concatenate(rows_columns).astype(np.int64),
        coefficient=np.concatenate(rows_coefficients).astype(np.float64),
        row_lower=np.array(row_lower, dtype=np.float64),
        row_upper=np.array(row_upper, dtype=np.float64),
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
        sign = self.steps.sign[self.marginal_steps]
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
        sign = self.steps.sign[self.marginal_steps].astype(np.int64)
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
        sign = self.steps.sign[self.marginal_steps].astype(np.int64)
        needed = -round(float(self.fixed_injection.sum())) - int(np.dot(sign, base_int))
        return base_int, fractional, needed

    def enumerate(self, z: FloatArray) -> IntArray | None:
        """Every floor/ceiling pattern of the fractional steps that keeps the balance: the best acceptable one."""
        base, fractional, needed = self._floor_base(z)
        energy = self.steps.energy_wh[self.marginal_steps]
        sign = self.steps.sign[self.marginal_steps].astype(np.int64)
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
        sign = self.steps.sign[self.marginal_steps]
        side = fractional[sign[fractional] == (1.0 if needed > 0 else -1.0)]
        if len(side) < abs(needed):
            return None
        largest = side[np.lexsort((side, -(z[side] - base[side])))][: abs(needed)]
        result = base.copy()
        result[largest] += 1
        return result

    def integer_program(self, continuous_flows: FloatArray) -> IntArray | None:
        """Whole-Wh marginal steps by a small integer program (SCIP): most welfare, then most volume."""
        from ortools.linear_solver import pywraplp  # type: ignore[attr-defined]

        solver = pywraplp.Solver.CreateSolver("SCIP")
        if solver is None or not len(self.marginal_steps):
            return None
        solver.SetTimeLimit(int(MIP_TIME_LIMIT_S * 1000))
        steps, marginal = self.steps, self.marginal_steps
        energy = steps.energy_wh[marginal]
        sign = steps.sign[marginal]
        levels = steps.level[marginal]
        is_buy = steps.is_buy[marginal]
        node_of = steps.node[marginal]
        variables = [solver.IntVar(0.0, float(q), f"z{i}") for i, q in enumerate(energy.tolist())]
        total = -float(self.fixed_injection.sum())
        balance = solver.RowConstraint(total, total, "balance")
        for variable, coefficient in zip(variables, sign.tolist(), strict=True):
            balance.SetCoefficient(variable, coefficient)
        if len(self.grid.lines):
            ptdf = self.grid.ptdf()
            fixed_flows = ptdf @ self.fixed_injection
            for line in range(len(self.grid.lines)):
                lower = -self.true_limits[line]
                upper = self.true_limits[line]
                if self.binding[line]:
                    # Keep a binding line within the allowance of its limit, in its direction.
                    near = self.true_limits[line] - self.allowance[line]
                    if continuous_flows[line] > FLOW_TOLERANCE_WH:
                        lower = max(lower, near)
                    elif continuous_flows[line] < -FLOW_TOLERANCE_WH:
                        upper = min(upper, -near)
                row = solver.RowConstraint(
                    float(lower - fixed_flows[line]), float(upper - fixed_flows[line]), f"line{line}"
                )
                for variable, coefficient in zip(
                    variables, (ptdf[line, node_of] * sign).tolist(), strict=True
                ):
                    if coefficient:
                        row.SetCoefficient(variable, coefficient)
        # Welfare relative to the mean level (the balance makes the shift free), plus
        # a volume term too small to outweigh one tick-Wh of welfare.
        reference = float(np.round(levels.mean()))
        objective = solver.Objective()
        volume_weight = 0.5 / (float(energy.sum()) + 1.0)
        for variable, level, buy in zip(variables, levels.tolist(), is_buy.tolist(), strict=True):
            per_wh = (level - reference) if buy else -(level - reference)
            objective.SetCoefficient(variable, per_wh + (volume_weight if buy else 0.0))
        objective.SetMaximization()
        if solver.Solve() not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
            return None
        result = np.clip(np.array([round(v.solution_value()) for v in variables], dtype=np.int64), 0, energy)
        return self.accept(result)
