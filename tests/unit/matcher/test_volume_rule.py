"""The volume rule's shortcut: where the held lines pin each node's net marginal energy, it is the volume LP's answer."""

from __future__ import annotations

from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from matcher_support import books, meshed_grids, radial_grids

from services.domain.grid import Grid
from services.matcher.bench import instances
from services.matcher.domain import allocation
from services.matcher.domain.clearing import clear
from services.matcher.domain.orders import ClearingInput
from services.matcher.domain.result import result_canonical_bytes

QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much]
PINNED = allocation._volume_on_a_pinned_face


@settings(max_examples=150, deadline=None, suppress_health_check=QUIET)
@given(st.data(), st.booleans())
def test_nets_pinned_by_the_balance_and_the_held_lines_clear_as_the_volume_lp_would(
    data: st.DataObject, meshed: bool
) -> None:
    grid = data.draw(meshed_grids(congested=True) if meshed else radial_grids(congested=True))
    request = data.draw(books(grid, max_orders=24))
    compare(request, grid, skip_unpinned=True)


@pytest.mark.parametrize("seed", [1, 2, 3, 4])
def test_generated_meshed_books_clear_as_the_volume_lp_would(seed: int) -> None:
    instance = next(instances((10_000,), ("meshed30",), seed))
    assert compare(instance.request, instance.grid, skip_unpinned=False)


def compare(request: ClearingInput, grid: Grid, *, skip_unpinned: bool) -> bool:
    """Clear with the shortcut and with the volume LP always solved: the same bytes. Whether the shortcut was taken."""
    pinned: list[bool] = []

    def recording(*arguments: object) -> object:
        result = PINNED(*arguments)  # type: ignore[arg-type]
        pinned.append(result is not None)
        return result

    with mock.patch.object(allocation, "_volume_on_a_pinned_face", recording):
        shortcut = clear(request, grid)
    if skip_unpinned:
        assume(any(pinned))
    with mock.patch.object(allocation, "_volume_on_a_pinned_face", lambda *arguments: None):
        solved = clear(request, grid)
    assert result_canonical_bytes(shortcut) == result_canonical_bytes(solved)
    return any(pinned)
