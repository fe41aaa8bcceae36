"""Where the price windows start on a meshed network: the first LP estimate refined on the book's own curves."""

from __future__ import annotations

import numpy as np
import pytest

from services.matcher.bench import instances
from services.matcher.domain import lp, model
from services.matcher.domain.clearing import clear
from services.matcher.domain.steps import aggregate, validate


@pytest.mark.parametrize(("orders", "seed"), [(10_000, 1), (10_000, 3), (100_000, 2)])
def test_the_refined_estimate_lies_within_a_few_levels_of_the_clearing_prices(orders: int, seed: int) -> None:
    # The benchmark's instance of that size and seed.
    instance = next(instances((orders,), ("meshed30",), seed))
    request, grid = instance.request, instance.grid
    steps = aggregate(validate(request, grid), grid)
    limits = np.asarray(grid.line_limits_wh, dtype=np.float64)
    # The first estimating round, as the solver runs it.
    crossing = model.crossing_level(steps)
    target = np.full(len(grid.nodes), crossing, dtype=np.int64)
    width = model.INITIAL_HALF_WIDTH_LEVELS
    layout = model.define_variables(steps, target - width, target + width, certify=False)
    first = lp.solve(model._program(steps, grid, layout, limits, reference_level=crossing))
    node_count, line_count = len(grid.nodes), len(grid.lines)
    first_levels = crossing + first.duals[:node_count]

    refined = model.refine_levels(
        steps, grid, limits, first_levels, first.duals[node_count + 1 : node_count + 1 + line_count]
    )

    assert refined is not None
    levels, last_move = refined
    final = clear(request, grid).node_price_micro_per_kwh / steps.tick_micro_per_kwh
    assert np.abs(levels - final).max() <= model.REFINE_CIRCLE_LEVELS
    assert last_move.max() <= model.REFINE_CIRCLE_LEVELS
    # The LP alone was much further off: the refinement is what saves a round.
    assert np.abs(first_levels - final).max() > 4 * model.REFINE_CIRCLE_LEVELS


def test_the_benchmark_s_meshed_book_is_certified_in_the_round_after_its_first_estimate() -> None:
    instance = next(instances((10_000,), ("meshed30",), 1))
    assert clear(instance.request, instance.grid).solver["lp_rounds"] == 2
