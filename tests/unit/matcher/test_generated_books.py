"""Books like the benchmark's (thousands of orders, congested meshed and radial grids) clear and verify."""

from __future__ import annotations

import numpy as np
import pytest

from services.matcher.bench import generate_orders, limit_loaded_lines, meshed_grid, radial_grid
from services.matcher.domain.clearing import clear
from services.matcher.domain.result import result_canonical_bytes, result_to_dict
from services.matcher.domain.verify import verify_result


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("network", ["meshed30", "radial100"])
def test_a_generated_congested_book_clears_to_a_verified_result(network: str, seed: int) -> None:
    if network == "meshed30":
        request = generate_orders(20_000, 30, seed=seed)
        grid = limit_loaded_lines(meshed_grid(seed=seed), request, limited=2 + seed)
    else:
        request = generate_orders(20_000, 100, seed=seed)
        grid = limit_loaded_lines(radial_grid(seed=seed), request, limited=3 + seed)
    result = clear(request, grid)
    assert result.binding.any()
    report = verify_result(request, grid, result_to_dict(result))
    # Whole-Wh rounding costs a few tick-Wh on each binding line: within 10 ppm of the welfare.
    assert report.welfare_gap_bound_nano <= 1e-5 * result.welfare_nano
    shuffled = request.take(np.random.default_rng(seed).permutation(len(request)))
    assert result_canonical_bytes(clear(shuffled, grid)) == result_canonical_bytes(result)
