"""The array interface to OR-tools' LP solver: the wire format it writes and the answers it reads."""

from __future__ import annotations

import numpy as np
import pytest
from ortools.linear_solver import linear_solver_pb2  # type: ignore[attr-defined]

from services.matcher.domain import lp


def small_program() -> lp.LinearProgram:
    # max x + 2y  s.t.  x + y <= 4,  -1 <= x - y <= 1,  0 <= x, y <= 3
    return lp.LinearProgram(
        lower=np.zeros(2),
        upper=np.array([3.0, 3.0]),
        objective=np.array([1.0, 2.0]),
        row_start=np.array([0, 2, 4]),
        column=np.array([0, 1, 0, 1]),
        coefficient=np.array([1.0, 1.0, 1.0, -1.0]),
        row_lower=np.array([-np.inf, -1.0]),
        row_upper=np.array([4.0, 1.0]),
        maximize=True,
    )


def test_the_request_is_the_protobuf_message_it_stands_for() -> None:
    columns = 300  # indices beyond one varint byte
    program = lp.LinearProgram(
        lower=np.zeros(columns),
        upper=np.arange(1.0, columns + 1),
        objective=-np.arange(columns, dtype=float),
        row_start=np.array([0, columns, columns + 2]),
        column=np.concatenate((np.arange(columns), [7, 299])),
        coefficient=np.concatenate((np.linspace(-1, 1, columns), [2.5, -0.5])),
        row_lower=np.array([0.0, -np.inf]),
        row_upper=np.array([10.0, 3.0]),
        maximize=False,
    )
    request = linear_solver_pb2.MPModelRequest.FromString(
        lp.encode_request(program, parameters="use_dual_simplex:true")
    )
    assert request.solver_type == linear_solver_pb2.MPModelRequest.GLOP_LINEAR_PROGRAMMING
    assert request.solver_specific_parameters == "use_dual_simplex:true"
    model = request.model
    assert not model.maximize
    assert [v.upper_bound for v in model.variable] == program.upper.tolist()
    assert [v.objective_coefficient for v in model.variable] == program.objective.tolist()
    assert list(model.constraint[0].var_index) == list(range(columns))
    assert list(model.constraint[0].coefficient) == program.coefficient[:columns].tolist()
    assert list(model.constraint[1].var_index) == [7, 299]
    assert model.constraint[1].lower_bound == -np.inf and model.constraint[1].upper_bound == 3.0


def test_a_small_lp_is_solved_with_its_duals() -> None:
    solution = lp.solve(small_program())
    assert solution.status == lp.OPTIMAL
    np.testing.assert_allclose(solution.values, [1.5, 2.5])
    assert solution.objective_value == pytest.approx(6.5)
    # Reduced costs are objective - A^T duals: zero for both basic columns.
    np.testing.assert_allclose(solution.duals, [1.5, -0.5])
    np.testing.assert_allclose(solution.reduced_costs, [0.0, 0.0], atol=1e-9)


def test_an_infeasible_lp_raises() -> None:
    program = small_program()
    infeasible = lp.LinearProgram(
        program.lower,
        program.upper,
        program.objective,
        program.row_start,
        program.column,
        program.coefficient,
        np.array([7.0, -1.0]),
        np.array([8.0, 1.0]),
    )
    with pytest.raises(lp.SolverError) as caught:
        lp.solve(infeasible)
    assert caught.value.status == lp.INFEASIBLE
