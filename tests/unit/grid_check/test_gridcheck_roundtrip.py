"""Imported networks survive being written out and read back: the same grid, the same flows.

Also guards the shipped files: each converted network under deploy/grids is
exactly what the importer makes of its source today.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from services.domain.grid import grid_from_dict, grid_to_dict, load_grid
from services.grid_check.domain.gridfile import dump_grid_yaml, flow_model_of, load_limits_yaml
from services.grid_check.domain.importers import ImportedNetwork, import_matpower, import_pandapower
from services.grid_check.domain.limits import effective_limits

GRIDS = Path(__file__).resolve().parents[3] / "deploy" / "grids"
SOURCES = GRIDS / "sources"
CONVERTED = {
    "ieee14.yaml": ("matpower", "case14.m"),
    "case30.yaml": ("matpower", "case30.m"),
    "cigre_lv.yaml": ("pandapower", "cigre_lv.json"),
    "cigre_mv_meshed.yaml": ("pandapower", "cigre_mv_meshed.json"),
}


def import_source(kind: str, name: str) -> ImportedNetwork:
    return (import_matpower if kind == "matpower" else import_pandapower)(SOURCES / name)


def random_balanced_injections(node_ids: tuple[str, ...], seed: int) -> npt.NDArray[np.float64]:
    rng = random.Random(seed)
    values = np.array([rng.uniform(-5e6, 5e6) for _ in node_ids], dtype=np.float64)
    balanced: npt.NDArray[np.float64] = values - values.mean()
    return balanced


@pytest.mark.parametrize("shipped", sorted(CONVERTED))
def test_a_network_written_to_yaml_and_read_back_gives_the_same_flows(shipped: str, tmp_path: Path) -> None:
    imported = import_source(*CONVERTED[shipped])
    before = grid_from_dict(imported.grid)
    path = tmp_path / "grid.yaml"
    path.write_text(dump_grid_yaml(grid_to_dict(before), header=imported.notes))
    after = load_grid(path)
    assert grid_to_dict(after) == grid_to_dict(before)
    for seed in range(3):
        injections = random_balanced_injections(before.node_ids, seed)
        np.testing.assert_array_equal(
            flow_model_of(after).flows_w(injections), flow_model_of(before).flows_w(injections)
        )


@pytest.mark.parametrize("shipped", sorted(CONVERTED))
def test_the_shipped_network_is_what_the_importer_makes_of_its_source(shipped: str) -> None:
    fresh = grid_to_dict(grid_from_dict(import_source(*CONVERTED[shipped]).grid))
    assert grid_to_dict(load_grid(GRIDS / shipped)) == fresh


def test_every_shipped_network_loads() -> None:
    shipped = sorted(GRIDS.glob("*.yaml"))
    assert {p.name for p in shipped} >= {"lv_feeder.yaml", *CONVERTED}
    for path in shipped:
        grid = load_grid(path)
        assert grid.slack in grid.node_ids


def test_the_low_voltage_feeder_is_radial_with_a_few_dozen_households() -> None:
    grid = load_grid(GRIDS / "lv_feeder.yaml")
    households = [n for n in grid.node_ids if n[1:].isdigit() and len(n) == 3]
    assert grid.is_radial
    assert len(households) == 36
    assert [line.id for line in grid.lines if line.transformer] == ["trafo"]


def test_the_medium_voltage_example_is_meshed() -> None:
    assert not load_grid(GRIDS / "cigre_mv_meshed.yaml").is_radial


def test_the_example_limits_apply_to_the_feeder_interval_by_interval() -> None:
    model = flow_model_of(load_grid(GRIDS / "lv_feeder.yaml"))
    schedule = load_limits_yaml(GRIDS / "examples" / "lv_feeder_limits.yaml", ratings_w=model.ratings_w)
    during = effective_limits(model.ratings_w, schedule, 1_799_312_400)  # 2027-01-07 09:00 UTC
    after = effective_limits(model.ratings_w, schedule, 1_799_337_600)  # 16:00, maintenance over
    assert during["A-cable3"].capacity_w == 0
    assert after["A-cable3"].capacity_w == model.ratings_w["A-cable3"]
    assert after["trafo"].capacity_w == 440_000
