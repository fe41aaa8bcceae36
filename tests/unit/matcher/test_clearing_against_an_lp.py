"""Random books on random grids, checked against an independent LP (scipy's HiGHS) and the certificate."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matcher_support import books, lp_optimum, meshed_grids, radial_grids, single_node

from services.domain.grid import Grid
from services.matcher.domain.clearing import clear
from services.matcher.domain.orders import ClearingInput
from services.matcher.domain.result import result_canonical_bytes, result_to_json
from services.matcher.domain.verify import verify_result

QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large]
# Window widths: 1 makes the price windows grow and the merged groups be
# certified; 10**6 puts every step in the LP.
WIDTHS = st.sampled_from([1, 4, 10**6])


def check(request: ClearingInput, grid: Grid, width: int, permutation: list[int]) -> None:
    result = clear(request, grid, initial_half_width=width)
    document = json.loads(result_to_json(result))
    report = verify_result(request, grid, document)

    # Welfare: never above the continuous optimum; on a single node or a radial
    # feeder (whose flows are whole Wh) equal to it with the limits rounded
    # down to whole Wh; on a meshed network within the duality bound that the
    # binding lines' shadow prices give.
    optimum = lp_optimum(request, grid)
    scale = 1e-9 * max(1.0, abs(optimum))
    assert result.welfare_nano <= optimum + 1e-6 + scale
    if grid.is_radial:
        whole = lp_optimum(request, grid, limits_wh=np.floor(grid.line_limits_wh + 1e-9))
        assert abs(result.welfare_nano - whole) <= 1e-6 + scale
    else:
        # Prices are rounded to whole micro: allow 1 micro per Wh of the book on top.
        slack = report.welfare_gap_bound_nano + float(np.sum(request.energy_wh)) + 1e-6 + scale
        assert optimum - result.welfare_nano <= slack

    # The same orders in another row order give the same bytes.
    shuffled = request.take(np.array(permutation, dtype=np.int64))
    assert result_canonical_bytes(clear(shuffled, grid, initial_half_width=width)) == result_canonical_bytes(
        result
    )


@pytest.mark.slow
@settings(max_examples=700, deadline=None, suppress_health_check=QUIET)
@given(st.data(), WIDTHS)
def test_a_single_node_clears_at_the_optimum(data: st.DataObject, width: int) -> None:
    grid = single_node()
    request = data.draw(books(grid, max_orders=16))
    check(request, grid, width, data.draw(st.permutations(list(range(len(request))))))


@pytest.mark.slow
@settings(max_examples=700, deadline=None, suppress_health_check=QUIET)
@given(st.data(), WIDTHS, st.booleans())
def test_a_radial_feeder_clears_at_the_whole_wh_optimum(
    data: st.DataObject, width: int, congested: bool
) -> None:
    grid = data.draw(radial_grids(congested=congested))
    request = data.draw(books(grid))
    check(request, grid, width, data.draw(st.permutations(list(range(len(request))))))


@pytest.mark.slow
@settings(max_examples=1300, deadline=None, suppress_health_check=QUIET)
@given(st.data(), WIDTHS, st.booleans())
def test_a_meshed_network_clears_within_the_rounding_of_whole_wh(
    data: st.DataObject, width: int, congested: bool
) -> None:
    grid = data.draw(meshed_grids(congested=congested))
    request = data.draw(books(grid))
    check(request, grid, width, data.draw(st.permutations(list(range(len(request))))))
