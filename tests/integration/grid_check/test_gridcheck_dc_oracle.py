"""grid_check's flows against pandapower's DC power flow (`rundcpp`) on public test networks.

Each network is exported with `pandapower.to_json`, imported by grid_check's
own importer (which parses the JSON and never imports pandapower), and given
the bus injections of pandapower's solution; every line and transformer flow
must agree with pandapower's within 0.1 % of the largest flow.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import pytest

from services.domain.grid import grid_from_dict
from services.grid_check.domain.checks import check_schedule
from services.grid_check.domain.gridfile import flow_model_of
from services.grid_check.domain.importers import ImportedNetwork, import_matpower, import_pandapower

SOURCES = Path(__file__).resolve().parents[3] / "deploy" / "grids" / "sources"
W_PER_MW = 1e6
TOLERANCE = 1e-3  # 0.1 % of the largest flow
K = TypeVar("K")


def run_dc(pp: ModuleType, net: Any) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pp.rundcpp(net)


def injections_w(net: Any, node_of_bus: dict[str, str]) -> dict[str, float]:
    """Net injection per node from pandapower's solution (res_bus.p_mw is positive for consumption)."""
    totals: dict[str, float] = {}
    for bus, row in net.res_bus.iterrows():
        node_id = node_of_bus.get(str(bus))
        if node_id is not None:
            totals[node_id] = totals.get(node_id, 0.0) - float(row.p_mw) * W_PER_MW
    return totals


def reference_flows_w(net: Any, imported: ImportedNetwork) -> dict[str, float]:
    flows: dict[str, float] = {}
    for index, row in net.res_line.iterrows():
        line_id = imported.line_of_branch.get(f"line {index}")
        if line_id is not None:
            flows[line_id] = float(row.p_from_mw) * W_PER_MW
    for index, row in net.res_trafo.iterrows():
        line_id = imported.line_of_branch.get(f"trafo {index}")
        if line_id is not None:
            flows[line_id] = float(row.p_hv_mw) * W_PER_MW
    return flows


def assert_flows_agree(ours: Mapping[K, float], reference: Mapping[K, float]) -> None:
    assert set(ours) == set(reference)
    largest = max(abs(v) for v in reference.values())
    assert largest > 0
    worst = max(reference, key=lambda k: abs(ours[k] - reference[k]))
    assert abs(ours[worst] - reference[worst]) <= TOLERANCE * largest, (
        worst,
        ours[worst],
        reference[worst],
    )


def perturb_loads(net: Any, seed: int) -> None:
    """A different operating point: every load scaled by a random factor in [0.2, 1.8]."""
    rng = random.Random(seed)
    net.load["p_mw"] = [float(p) * rng.uniform(0.2, 1.8) for p in net.load["p_mw"]]


def cigre_mv_meshed(pp: ModuleType) -> Any:
    net = pp.networks.create_cigre_network_mv(with_der="pv_wind")
    net.switch["closed"] = True
    return net


NETWORKS: dict[str, Callable[[ModuleType], Any]] = {
    "IEEE 14": lambda pp: pp.networks.case14(),
    "MATPOWER case30": lambda pp: pp.networks.case30(),
    "IEEE 118": lambda pp: pp.networks.case118(),
    "CIGRE LV": lambda pp: pp.networks.create_cigre_network_lv(),
    "CIGRE MV meshed": cigre_mv_meshed,
    "Kerber Dorfnetz": lambda pp: pp.networks.create_kerber_dorfnetz(),
}


@pytest.mark.parametrize("name", sorted(NETWORKS))
@pytest.mark.parametrize("seed", [None, 7])
def test_flows_agree_with_pandapower_dc_power_flow(
    pp: ModuleType, tmp_path: Path, name: str, seed: int | None
) -> None:
    net = NETWORKS[name](pp)
    if seed is not None:
        perturb_loads(net, seed)
    path = tmp_path / "net.json"
    pp.to_json(net, str(path))
    run_dc(pp, net)
    imported = import_pandapower(path)
    model = flow_model_of(grid_from_dict(imported.grid))
    # Through the same checked path as a schedule: injections must balance within 1 W.
    result = check_schedule(model, injections_w(net, imported.node_of_bus))
    ours = {line.line_id: line.flow_w for line in result.lines}
    assert_flows_agree(ours, reference_flows_w(net, imported))


@pytest.mark.parametrize(("case", "make"), [("case14", "case14"), ("case30", "case30")])
def test_the_shipped_matpower_files_give_pandapowers_flows_for_the_same_case(
    pp: ModuleType, case: str, make: str
) -> None:
    imported = import_matpower(SOURCES / f"{case}.m")
    net = getattr(pp.networks, make)()
    run_dc(pp, net)
    # pandapower's conversion names each bus by its MATPOWER number.
    node_of_bus = {str(bus): f"bus{int(net.bus.name[bus])}" for bus in net.bus.index}
    model = flow_model_of(grid_from_dict(imported.grid))
    result = check_schedule(model, injections_w(net, node_of_bus))
    ours = {line.line_id: line.flow_w for line in result.lines}
    # Match branches by their end buses (parallel branches are summed).
    by_ends: dict[tuple[str, str], float] = {}
    for line in model.lines:
        key = (line.from_node, line.to_node)
        by_ends[key] = by_ends.get(key, 0.0) + ours[line.line_id]
    reference: dict[tuple[str, str], float] = {}
    for table, a, b, p in (
        ("line", "from_bus", "to_bus", "p_from_mw"),
        ("trafo", "hv_bus", "lv_bus", "p_hv_mw"),
    ):
        elements = getattr(net, table)
        for index, row in getattr(net, f"res_{table}").iterrows():
            key = (node_of_bus[str(elements[a][index])], node_of_bus[str(elements[b][index])])
            reference[key] = reference.get(key, 0.0) + float(row[p]) * W_PER_MW
    assert_flows_agree(by_ends, reference)


@pytest.mark.parametrize("case", ["case14", "case30"])
def test_the_matpower_and_pandapower_importers_agree_on_the_same_case(
    pp: ModuleType, tmp_path: Path, case: str
) -> None:
    from_matpower = import_matpower(SOURCES / f"{case}.m")
    net = getattr(pp.networks, case)()
    path = tmp_path / "net.json"
    pp.to_json(net, str(path))
    from_pandapower = import_pandapower(path)
    # Rename the pandapower nodes after their MATPOWER bus numbers (pandapower keeps them as names).
    rename = {f"bus{bus}": f"bus{int(net.bus.name[bus])}" for bus in net.bus.index}
    grid_pp = grid_from_dict(from_pandapower.grid)
    grid_mp = grid_from_dict(from_matpower.grid)
    rng = random.Random(11)
    injections = {
        node_id: rng.uniform(-50e6, 50e6) for node_id in grid_mp.node_ids if node_id != grid_mp.slack
    }
    model_mp, model_pp = flow_model_of(grid_mp), flow_model_of(grid_pp)
    flows_mp = check_schedule(model_mp, injections, slack_balances=True)
    injections_pp = {
        pp_id: injections.get(mp_id, 0.0) for pp_id, mp_id in rename.items() if mp_id != grid_mp.slack
    }
    flows_pp = check_schedule(model_pp, injections_pp, slack_balances=True)

    def by_ends(model: Any, lines: Any, names: dict[str, str]) -> dict[tuple[str, str], float]:
        out: dict[tuple[str, str], float] = {}
        for spec, loading in zip(model.lines, lines, strict=True):
            key = (names.get(spec.from_node, spec.from_node), names.get(spec.to_node, spec.to_node))
            out[key] = out.get(key, 0.0) + loading.flow_w
        return out

    assert_flows_agree(by_ends(model_pp, flows_pp.lines, rename), by_ends(model_mp, flows_mp.lines, {}))
