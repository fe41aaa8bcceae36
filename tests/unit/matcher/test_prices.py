"""Congested node prices: where the marginal nodes pin them, they are the ones the rule's sequence of small LPs picks."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from matcher_support import books, meshed_grids, radial_grids

from services.domain.grid import Grid
from services.matcher.bench import generate_orders, limit_loaded_lines, meshed_grid, radial_grid
from services.matcher.domain.allocation import allocate
from services.matcher.domain.orders import ClearingInput
from services.matcher.domain.prices import (
    _NO_BOUND,
    _congested_prices,
    _pinned_prices,
    node_bounds,
)
from services.matcher.domain.steps import aggregate, validate

QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]


def pinned_and_solved(request: ClearingInput, grid: Grid) -> bool:
    """Compare the pinned prices with the small LPs' where the former exist; whether they did."""
    steps = aggregate(validate(request, grid), grid)
    allocation = allocate(steps, grid)
    low, high = node_bounds(steps, allocation.accepted_wh, len(grid.nodes))
    bounded_low = low > -_NO_BOUND
    bounded_high = high < _NO_BOUND
    if not (bounded_low.any() and bounded_high.any() and low[bounded_low].max() > high[bounded_high].min()):
        return False  # one price fits every node: not congested
    arguments = (
        grid,
        low,
        high,
        bounded_low,
        bounded_high,
        allocation.flows_wh,
        np.flatnonzero(allocation.binding),
        steps.tick_micro_per_kwh,
    )
    pinned = _pinned_prices(*arguments)
    if pinned is None:
        return False
    solved = _congested_prices(*arguments, room=1e-6)
    assert pinned.price_micro_per_kwh.tolist() == solved.price_micro_per_kwh.tolist()
    # The small LPs' answers carry the solver's floating-point dust.
    assert np.abs(pinned.shadow_price_micro_per_kwh - solved.shadow_price_micro_per_kwh).max() <= 1e-6
    return True


@settings(max_examples=300, deadline=None, suppress_health_check=QUIET)
@given(st.data(), st.booleans())
def test_prices_pinned_by_the_marginal_nodes_are_the_ones_the_small_lps_choose(
    data: st.DataObject, meshed: bool
) -> None:
    grid = data.draw(meshed_grids(congested=True) if meshed else radial_grids(congested=True))
    request = data.draw(books(grid))
    assume(pinned_and_solved(request, grid))


@pytest.mark.parametrize("network", ["meshed30", "radial100"])
def test_a_generated_congested_book_has_pinned_prices_equal_to_the_small_lps_choice(network: str) -> None:
    if network == "meshed30":
        request = generate_orders(10_000, 30, seed=7)
        grid = limit_loaded_lines(meshed_grid(seed=7), request, limited=4)
    else:
        request = generate_orders(10_000, 100, seed=7)
        grid = limit_loaded_lines(radial_grid(seed=7), request, limited=6)
    assert pinned_and_solved(request, grid)
