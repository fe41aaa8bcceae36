"""Small networks for grid_check's unit tests, built through the same path as a grid file."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from services.grid_check.domain.network import FlowModel


def grid_dict(lines: list[dict[str, Any]], *, slack: str = "n0") -> dict[str, Any]:
    node_ids = sorted({slack} | {line["from"] for line in lines} | {line["to"] for line in lines})
    return {
        "interval_minutes": 15,
        "price_tick_micro_per_kwh": 100,
        "slack": slack,
        "nodes": [{"id": node_id} for node_id in node_ids],
        "lines": lines,
    }


@pytest.fixture
def make_model() -> Callable[..., FlowModel]:
    def build(lines: list[dict[str, Any]], *, slack: str = "n0") -> FlowModel:
        from services.grid_check.domain.gridfile import flow_model_from_dict

        return flow_model_from_dict(grid_dict(lines, slack=slack))

    return build


@pytest.fixture
def radial_model(make_model: Callable[..., FlowModel]) -> FlowModel:
    """n0 (slack) - n1 - n2, and n1 - n3: flows follow from the injections alone."""
    return make_model(
        [
            {"id": "l1", "from": "n0", "to": "n1", "capacity_w": 50_000},
            {"id": "l2", "from": "n1", "to": "n2", "capacity_w": 20_000},
            {"id": "l3", "from": "n1", "to": "n3", "capacity_w": 20_000},
        ]
    )


@pytest.fixture
def triangle_model(make_model: Callable[..., FlowModel]) -> FlowModel:
    """A loop n0-n1-n2 with reactances 1, 1, 2 (per unit): flows split by reactance."""
    return make_model(
        [
            {"id": "a", "from": "n0", "to": "n1", "capacity_w": 100_000, "reactance_pu": 1.0},
            {"id": "b", "from": "n1", "to": "n2", "capacity_w": 100_000, "reactance_pu": 1.0},
            {"id": "c", "from": "n0", "to": "n2", "capacity_w": 100_000, "reactance_pu": 2.0},
        ]
    )
