"""Shared helpers for the matcher's tests: small grids and books, and an independent LP optimum.

The optimum comes from scipy's `linprog` (HiGHS), formulated per order rather
than per price step: it shares nothing with the matcher's OR-tools model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from hypothesis import strategies as st
from scipy.optimize import linprog

from services.domain.grid import Grid, grid_from_dict
from services.matcher.domain.orders import ClearingInput, Order
from services.matcher.domain.rules import rounding_margin_wh

TICK = 100


def grid_from_lines(lines: Sequence[dict[str, Any]], *, nodes: int, slack: str = "n0") -> Grid:
    return grid_from_dict(
        {
            "interval_minutes": 15,
            "price_tick_micro_per_kwh": TICK,
            "slack": slack,
            "nodes": [{"id": f"n{i}"} for i in range(nodes)],
            "lines": list(lines),
        }
    )


def single_node() -> Grid:
    return grid_from_lines([], nodes=1)


def line(line_id: str, a: int, b: int, capacity_w: int, reactance: float | None = None) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": line_id, "from": f"n{a}", "to": f"n{b}", "capacity_w": capacity_w}
    if reactance is not None:
        entry["reactance_pu"] = reactance
    return entry


def book(
    rows: Sequence[tuple[str, str, str, int, int]], grid: Grid, *, sequence: Sequence[int] | None = None
) -> ClearingInput:
    """Orders from (order_id, node_id, side, energy_wh, price_micro_per_kwh) rows; book order = row order."""
    orders = [
        Order(order_id, f"p-{order_id}", node, side, energy, price, None if sequence is None else sequence[i])
        for i, (order_id, node, side, energy, price) in enumerate(rows)
    ]
    if sequence is None:
        orders = [
            Order(o.order_id, o.participant_id, o.node_id, o.side, o.energy_wh, o.price_micro_per_kwh, i)
            for i, o in enumerate(orders)
        ]
    return ClearingInput.from_orders(orders, grid)


def lp_optimum(request: ClearingInput, grid: Grid, *, limits_wh: np.ndarray | None = None) -> float:
    """The welfare optimum (nano) of the continuous problem, one variable per order, by HiGHS."""
    count = len(request)
    if count == 0:
        return 0.0
    price = np.asarray(request.price_micro_per_kwh, dtype=float)
    energy = np.asarray(request.energy_wh, dtype=float)
    is_buy = np.asarray(request.is_buy)
    sign = np.where(is_buy, -1.0, 1.0)
    cost = -np.where(is_buy, price, -price)
    incidence = np.zeros((len(grid.nodes), count))
    incidence[np.asarray(request.node_index), np.arange(count)] = sign
    limits = grid.line_limits_wh if limits_wh is None else limits_wh
    a_ub = b_ub = None
    if len(grid.lines):
        flows = grid.ptdf() @ incidence
        a_ub = np.vstack([flows, -flows])
        b_ub = np.concatenate([limits, limits])
    result = linprog(
        cost,
        A_ub=a_ub,
        b_ub=b_ub,
        A_eq=sign[None, :],
        b_eq=[0.0],
        bounds=np.column_stack([np.zeros(count), energy]),
        method="highs",
    )
    assert result.status == 0, result.message
    return float(-result.fun)


@st.composite
def radial_grids(draw: st.DrawFn, *, congested: bool) -> Grid:
    count = draw(st.integers(2, 6))
    lines = []
    for child in range(1, count):
        parent = draw(st.integers(0, child - 1))
        a, b = (parent, child) if draw(st.booleans()) else (child, parent)
        capacity = draw(st.integers(0, 50)) * 4 + draw(st.integers(0, 3)) if congested else 10**9
        lines.append(line(f"l{child}", a, b, capacity))
    return grid_from_lines(lines, nodes=count, slack=f"n{draw(st.integers(0, count - 1))}")


@st.composite
def meshed_grids(draw: st.DrawFn, *, congested: bool) -> Grid:
    """A tree plus one to three extra lines (loops, possibly parallel lines), every limit above its rounding margin."""
    count = draw(st.integers(2, 6))
    lines = [
        line(f"l{child}", draw(st.integers(0, child - 1)), child, 0, draw(st.floats(0.2, 2.0)))
        for child in range(1, count)
    ]
    for extra in range(draw(st.integers(1, 3))):
        a, b = draw(st.lists(st.integers(0, count - 1), min_size=2, max_size=2, unique=True))
        lines.append(line(f"m{extra}", a, b, 0, draw(st.floats(0.2, 2.0))))
    # Limits must cover the rounding margin on a meshed network; draw them above it.
    probe = grid_from_lines([{**entry, "capacity_w": 10**9} for entry in lines], nodes=count)
    margins = rounding_margin_wh(probe)
    for index, entry in enumerate(lines):
        floor_w = math.ceil(margins[index] * 4)
        entry["capacity_w"] = floor_w + (draw(st.integers(0, 120)) if congested else 10**9)
    return grid_from_lines(lines, nodes=count)


@st.composite
def books(draw: st.DrawFn, grid: Grid, *, max_orders: int = 14) -> ClearingInput:
    """Small books with few price levels (ties are common) and small energies."""
    count = draw(st.integers(0, max_orders))
    node_count = len(grid.nodes)
    rows = []
    for i in range(count):
        node = draw(st.integers(0, node_count - 1))
        side = draw(st.sampled_from(["buy", "sell"]))
        energy = draw(st.integers(1, 60))
        level = draw(st.integers(0, 8))
        rows.append((f"o{i}", grid.node_ids[node], side, energy, level * TICK))
    sequence = draw(st.permutations(list(range(count)))) if count else []
    return book(rows, grid, sequence=sequence)
