"""The shared grid model: loading and validating the YAML form, and DC power-flow PTDFs."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.domain.grid import ConsistencyError, grid_from_dict, grid_to_dict, load_grid

ISSUE_EXAMPLE = """
interval_minutes: 15
price_tick_micro_per_kwh: 100
slack: n0
nodes: [{id: n0}, {id: n1}, {id: n2}]
lines:
  - {id: l1, from: n0, to: n1, capacity_w: 50000, reactance_pu: 0.01}  # reactance_pu optional where there is no loop
  - {id: l2, from: n1, to: n2, capacity_w: 20000}
"""


def grid_data(lines: list[dict[str, Any]], *, nodes: int | None = None, slack: str = "n0") -> dict[str, Any]:
    count = (
        nodes
        if nodes is not None
        else 1 + max(int(n[1:]) for line in lines for n in (line["from"], line["to"]))
    )
    return {
        "interval_minutes": 15,
        "price_tick_micro_per_kwh": 100,
        "slack": slack,
        "nodes": [{"id": f"n{i}"} for i in range(count)],
        "lines": lines,
    }


def line(
    line_id: str, a: int, b: int, capacity_w: int = 10_000, reactance: float | None = None
) -> dict[str, Any]:
    entry: dict[str, Any] = {"id": line_id, "from": f"n{a}", "to": f"n{b}", "capacity_w": capacity_w}
    if reactance is not None:
        entry["reactance_pu"] = reactance
    return entry


def test_the_minimal_form_from_the_issue_loads_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "grid.yaml"
    path.write_text(ISSUE_EXAMPLE, encoding="utf-8")
    grid = load_grid(path)
    assert grid.node_ids == ("n0", "n1", "n2")
    assert grid.line_ids == ("l1", "l2")
    assert grid.slack == "n0" and grid.interval_minutes == 15 and grid.price_tick_micro_per_kwh == 100
    assert grid.is_radial
    # A feeder's flows follow from the injections alone: whatever is injected
    # at n2 flows back through l2 and l1 to the slack.
    np.testing.assert_array_equal(grid.ptdf(), [[0, -1, -1], [0, 0, -1]])


def test_a_line_limit_is_its_capacity_over_the_interval_exactly() -> None:
    grid = grid_from_dict(grid_data([line("l1", 0, 1, 50_000), line("l2", 1, 2, 50_001)]))
    assert grid.line_limit_wh("l1") == 12_500
    assert grid.line_limit_wh(1) == Fraction(50_001, 4)
    np.testing.assert_array_equal(grid.line_limits_wh, [12_500.0, 12_500.25])


def test_flows_on_a_loop_split_in_inverse_proportion_to_the_path_reactance() -> None:
    grid = grid_from_dict(
        grid_data(
            [line("a", 0, 1, reactance=1.0), line("b", 1, 2, reactance=1.0), line("c", 0, 2, reactance=2.0)]
        )
    )
    flows = grid.flows_w([12_000, -12_000, 0])
    # Direct path x=1 against the detour n0-n2-n1 with x=3: 3/4 and 1/4.
    np.testing.assert_allclose(flows, [9_000, -3_000, 3_000])
    assert not grid.is_radial
    np.testing.assert_array_equal(grid.ptdf()[:, grid.slack_index], 0.0)


def test_parallel_lines_share_a_transfer_by_their_reactances() -> None:
    grid = grid_from_dict(grid_data([line("p1", 0, 1, reactance=0.01), line("p2", 0, 1, reactance=0.03)]))
    np.testing.assert_allclose(grid.flows_wh([-400, 400]), [-300, -100])


def test_the_slack_takes_up_what_the_injections_leave_unbalanced() -> None:
    grid = grid_from_dict(grid_data([line("l1", 0, 1), line("l2", 1, 2)]))
    np.testing.assert_allclose(grid.flows_w([0, 0, 500]), grid.flows_w([-500, 0, 500]))


def test_a_zero_capacity_line_is_a_valid_element() -> None:
    grid = grid_from_dict(grid_data([line("l1", 0, 1, 0)]))
    assert grid.lines[0].capacity_w == 0
    assert grid.line_limit_wh("l1") == 0


@pytest.mark.parametrize(
    ("data", "element", "rule"),
    [
        (grid_data([line("l1", 0, 7)], nodes=3), "line l1", "unknown node 'n7'"),
        (grid_data([line("l1", 0, 1)], nodes=3), "node n2", "islanded"),
        (grid_data([{"id": "l1", "from": "n0", "to": "n1"}], nodes=2), "line l1", "capacity_w is missing"),
        (grid_data([line("l1", 0, 1, -5)]), "line l1", "must not be negative"),
        (grid_data([line("l1", 0, 1), line("l2", 1, 2), line("l3", 2, 0)]), "line l1", "lies on a loop"),
        (grid_data([line("l1", 0, 1), line("l1", 1, 2)]), "line l1", "duplicate line id"),
        (grid_data([line("l1", 0, 0)], nodes=1), "line l1", "joins node 'n0' to itself"),
        (grid_data([line("l1", 0, 1, reactance=0.0)]), "line l1", "finite and non-zero"),
        ({**grid_data([line("l1", 0, 1)]), "slack": "n9"}, "slack", "not one of the nodes"),
        ({k: v for k, v in grid_data([line("l1", 0, 1)]).items() if k != "slack"}, "slack", "is missing"),
        (
            {**grid_data([line("l1", 0, 1)]), "nodes": [{"id": "n0"}, {"id": "n0"}, {"id": "n1"}]},
            "node n0",
            "duplicate",
        ),
        ({**grid_data([line("l1", 0, 1)]), "interval_minutes": 0}, "interval_minutes", "positive"),
        (
            {**grid_data([line("l1", 0, 1)]), "price_tick_micro_per_kwh": True},
            "price_tick_micro_per_kwh",
            "positive",
        ),
        ({**grid_data([line("l1", 0, 1, capacity_w=True)])}, "line l1", "whole number of watts"),
    ],
)
def test_a_bad_grid_is_rejected_naming_the_element_and_the_rule(
    data: dict[str, Any], element: str, rule: str
) -> None:
    with pytest.raises(ConsistencyError) as caught:
        grid_from_dict(data)
    assert caught.value.element == element
    assert rule in caught.value.rule


def test_the_loop_a_missing_reactance_lies_on_is_named() -> None:
    with pytest.raises(
        ConsistencyError, match=r"line c: reactance_pu is missing, but the line lies on a loop \(c, a, b\)"
    ):
        grid_from_dict(
            grid_data([line("a", 0, 1, reactance=1.0), line("b", 1, 2, reactance=1.0), line("c", 2, 0)])
        )


def test_parallel_lines_need_reactances_because_they_form_a_loop() -> None:
    with pytest.raises(ConsistencyError, match="line p2: reactance_pu is missing"):
        grid_from_dict(grid_data([line("p1", 0, 1, reactance=1.0), line("p2", 0, 1)]))


def test_invalid_yaml_is_reported_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("nodes: [\n", encoding="utf-8")
    with pytest.raises(ConsistencyError, match="not valid YAML"):
        load_grid(path)


def test_the_yaml_form_round_trips_with_extra_fields_kept() -> None:
    data = grid_data(
        [
            line("l1", 0, 1, reactance=0.5),
            line("l2", 1, 2, 7, reactance=0.25),
            line("l3", 2, 0, reactance=1.0),
        ]
    )
    data["lines"][0]["transformer"] = True
    data["lines"][1]["name"] = "Dorfstrasse"
    data["nodes"][2]["vn_kv"] = 0.4
    data["source"] = "case3.m"
    grid = grid_from_dict(data)
    assert grid.lines[0].transformer
    assert grid_to_dict(grid) == data
    assert grid_to_dict(grid_from_dict(grid_to_dict(grid))) == data


def test_integer_ids_are_read_as_their_text() -> None:
    grid = grid_from_dict(
        {
            "interval_minutes": 15,
            "price_tick_micro_per_kwh": 100,
            "slack": 1,
            "nodes": [{"id": 1}, {"id": 2}],
            "lines": [{"id": 7, "from": 1, "to": 2, "capacity_w": 4.0e3}],
        }
    )
    assert grid.node_ids == ("1", "2") and grid.line_ids == ("7",)
    assert grid.lines[0].capacity_w == 4000


@st.composite
def trees(draw: st.DrawFn) -> tuple[dict[str, Any], list[int]]:
    """A random tree (each node hangs off an earlier one) with random line directions."""
    count = draw(st.integers(2, 12))
    parents = [draw(st.integers(0, i - 1)) for i in range(1, count)]
    lines = []
    for child, parent in enumerate(parents, start=1):
        a, b = (parent, child) if draw(st.booleans()) else (child, parent)
        lines.append(line(f"l{child}", a, b))
    return grid_data(lines, nodes=count, slack=f"n{draw(st.integers(0, count - 1))}"), [-1, *parents]


@settings(max_examples=150, deadline=None)
@given(trees(), st.data())
def test_a_radial_line_carries_the_net_injection_of_its_side_without_the_slack(
    tree: tuple[dict[str, Any], list[int]], data: st.DataObject
) -> None:
    grid_dict, _parents = tree
    grid = grid_from_dict(grid_dict)
    assert grid.is_radial
    ptdf = grid.ptdf()
    assert set(np.unique(ptdf).tolist()) <= {-1.0, 0.0, 1.0}
    injections = np.array(
        data.draw(st.lists(st.integers(-1000, 1000), min_size=len(grid.nodes), max_size=len(grid.nodes)))
    )
    flows = grid.flows_wh(injections)
    # Cut each line: the side without the slack pushes its net injection through it.
    for index, entry in enumerate(grid.lines):
        side = _side_without(grid_dict, skip=index, start=entry.to_node, slack=grid.slack)
        sign = -1 if side is not None else 1
        side = (
            side
            if side is not None
            else _side_without(grid_dict, skip=index, start=entry.from_node, slack=grid.slack)
        )
        assert side is not None
        expected = sign * sum(int(injections[grid.node_index[n]]) for n in side)
        assert flows[index] == expected


def _side_without(grid_dict: dict[str, Any], *, skip: int, start: str, slack: str) -> set[str] | None:
    seen = {start}
    frontier = [start]
    while frontier:
        node = frontier.pop()
        for index, entry in enumerate(grid_dict["lines"]):
            if index == skip:
                continue
            for a, b in ((entry["from"], entry["to"]), (entry["to"], entry["from"])):
                if a == node and b not in seen:
                    seen.add(b)
                    frontier.append(b)
    return None if slack in seen else seen


@st.composite
def meshed_grids(draw: st.DrawFn) -> dict[str, Any]:
    count = draw(st.integers(3, 9))
    lines = [
        line(f"t{i}", draw(st.integers(0, i - 1)), i, reactance=draw(st.floats(0.01, 2.0)))
        for i in range(1, count)
    ]
    for extra in range(draw(st.integers(1, 4))):
        a, b = draw(st.lists(st.integers(0, count - 1), min_size=2, max_size=2, unique=True))
        lines.append(line(f"m{extra}", a, b, reactance=draw(st.floats(0.01, 2.0))))
    return grid_data(lines, nodes=count)


@settings(max_examples=150, deadline=None)
@given(meshed_grids(), st.data())
def test_meshed_flows_conserve_energy_at_every_node(grid_dict: dict[str, Any], data: st.DataObject) -> None:
    grid = grid_from_dict(grid_dict)
    size = len(grid.nodes)
    injections = np.array(
        data.draw(st.lists(st.integers(-1000, 1000), min_size=size, max_size=size)), dtype=float
    )
    injections[grid.slack_index] -= injections.sum()
    flows = grid.flows_wh(injections)
    # What enters a node over its lines plus its injection leaves it: A^T f = injections.
    leaving = np.zeros(size)
    for index, entry in enumerate(grid.lines):
        leaving[grid.node_index[entry.from_node]] += flows[index]
        leaving[grid.node_index[entry.to_node]] -= flows[index]
    np.testing.assert_allclose(leaving, injections, atol=1e-6)
    # Bridges (lines on no loop) still have exact rows.
    for bridge in np.flatnonzero(grid.bridges).tolist():
        assert set(np.unique(grid.ptdf()[bridge]).tolist()) <= {-1.0, 0.0, 1.0}


def test_the_search_tree_of_a_feeder_gives_each_node_the_line_it_hangs_from() -> None:
    grid = grid_from_dict(grid_data([line("l1", 0, 1), line("l2", 2, 1), line("l3", 1, 3)]))
    order, entry = grid.search_tree()
    assert order[0] == grid.slack_index
    assert entry[grid.slack_index] == -1
    assert sorted(grid.line_ids[entry[n]] for n in order[1:]) == ["l1", "l2", "l3"]


def test_a_utility_at_the_connection_point_is_read_and_written_back() -> None:
    data = grid_data([line("l1", 0, 1)])
    data["utility"] = {"retail_price_per_kwh": "0.3", "feed_in_price_per_kwh": 0.08, "capacity_w": 400_000}
    grid = grid_from_dict(data)
    assert grid.utility is not None
    assert (
        grid.utility.node,
        grid.utility.retail_price_micro_per_kwh,
        grid.utility.feed_in_price_micro_per_kwh,
    ) == (
        "n0",
        300_000,
        80_000,
    )
    assert grid_to_dict(grid)["utility"] == {
        "node": "n0",
        "retail_price_per_kwh": "0.3",
        "feed_in_price_per_kwh": "0.08",
        "capacity_w": 400_000,
    }


@pytest.mark.parametrize(
    ("utility", "rule"),
    [
        ({"retail_price_per_kwh": "0.1", "feed_in_price_per_kwh": "0.2", "capacity_w": 1}, "must not exceed"),
        (
            {"retail_price_per_kwh": "0.30005", "feed_in_price_per_kwh": "0.2", "capacity_w": 1},
            "not on the market's tick",
        ),
        ({"feed_in_price_per_kwh": "0.2", "capacity_w": 1}, "retail_price_per_kwh is missing"),
        (
            {"retail_price_per_kwh": "0.3", "feed_in_price_per_kwh": "0.2", "capacity_w": -1},
            "capacity_w must be",
        ),
        (
            {"node": "n9", "retail_price_per_kwh": "0.3", "feed_in_price_per_kwh": "0.2", "capacity_w": 1},
            "not one of the nodes",
        ),
    ],
)
def test_a_bad_utility_is_rejected(utility: dict[str, Any], rule: str) -> None:
    with pytest.raises(ConsistencyError) as caught:
        grid_from_dict({**grid_data([line("l1", 0, 1)]), "utility": utility})
    assert caught.value.element == "utility" and rule in caught.value.rule
