"""MATPOWER and pandapower importers: the mapping rules, and source files they must refuse."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from services.grid_check.domain.importers import (
    DEFAULT_UNRATED_CAPACITY_W,
    ImportOptions,
    NetworkImportError,
    matpower_to_grid,
    pandapower_to_grid,
    parse_matpower,
    parse_pandapower_json,
)

CASE = """function mpc = tiny
%% a four-bus case: 1 (reference) - 2 - 3 with a transformer 2-3, bus 4 isolated
mpc.version = '2';
mpc.baseMVA = 100;
%	bus_i	type	Pd	Qd	Gs	Bs	area	Vm	Va	baseKV	zone	Vmax	Vmin
mpc.bus = [
	1	3	0	0	0	0	1	1	0	132	1	1.1	0.9;
	2	1	50	10	0	0	1	1	0	132	1	1.1	0.9;
	3	1	20	5	0	0	1	1	0	33	1	1.1	0.9;
	4	4	0	0	0	0	1	1	0	33	1	1.1	0.9;
];
%	fbus	tbus	r	x	b	rateA	rateB	rateC	ratio	angle	status	angmin	angmax
mpc.branch = [
	1	2	0.01	0.1	0	0	0	0	0	0	1	-360	360;
	1	2	0.01	0.1	0	80	0	0	0	0	0	-360	360;
	2	3	0	0.2	0	50	0	0	0.95	0	1	-360	360;
	3	4	0	0.2	0	50	0	0	0	0	1	-360	360;
	1	3	0.02	0.3	0	120.5	0	0	0	0	1	-360	360;
];
mpc.bus_name = {
	'North 132% kV';
	'Middle';
	'South';
	'Spare';
};
"""


def lines_by_id(grid: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {line["id"]: line for line in grid["lines"]}


def test_matpower_buses_become_nodes_and_the_reference_bus_the_slack() -> None:
    imported = matpower_to_grid(parse_matpower(CASE))
    grid = imported.grid
    assert grid["slack"] == "bus1"
    assert [n["id"] for n in grid["nodes"]] == ["bus1", "bus2", "bus3"]
    assert grid["nodes"][0]["name"] == "North 132% kV"
    assert grid["base_mva"] == 100
    assert imported.node_of_bus == {"1": "bus1", "2": "bus2", "3": "bus3"}


def test_matpower_branches_map_reactance_times_tap_rating_and_transformer_flag() -> None:
    lines = lines_by_id(matpower_to_grid(parse_matpower(CASE)).grid)
    # Row 2 is out of service and row 4 ends at the isolated bus: both dropped.
    assert sorted(lines) == ["br1", "br3", "br5"]
    assert lines["br1"] == {
        "id": "br1",
        "from": "bus1",
        "to": "bus2",
        "capacity_w": DEFAULT_UNRATED_CAPACITY_W,
        "reactance_pu": 0.1,
    }
    assert lines["br3"]["reactance_pu"] == pytest.approx(0.2 * 0.95)
    assert lines["br3"]["transformer"] is True
    assert lines["br3"]["capacity_w"] == 50_000_000
    assert lines["br5"]["capacity_w"] == 120_500_000
    assert "transformer" not in lines["br5"]


def test_matpower_unrated_branches_take_the_configured_capacity() -> None:
    imported = matpower_to_grid(parse_matpower(CASE), ImportOptions(unrated_capacity_w=7_000_000))
    assert lines_by_id(imported.grid)["br1"]["capacity_w"] == 7_000_000


def test_matpower_import_notes_what_it_dropped() -> None:
    notes = " ".join(matpower_to_grid(parse_matpower(CASE)).notes)
    assert "1 isolated bus" in notes and "1 out-of-service branch" in notes


def test_a_case_that_computes_its_data_is_refused_naming_the_line() -> None:
    text = CASE + "mpc.bus(:, 3) = mpc.bus(:, 3) / 1e3;\n"
    with pytest.raises(NetworkImportError, match=r"line 26: unsupported statement 'mpc.bus\(:, 3\)"):
        parse_matpower(text)


def test_a_matrix_entry_that_is_not_a_number_is_refused_naming_the_line() -> None:
    with pytest.raises(NetworkImportError, match=r"line 8: mpc\.bus holds 'x2'"):
        parse_matpower(CASE.replace("\t2\t1\t50", "\tx2\t1\t50"))


def test_a_case_without_a_reference_bus_has_no_slack_unless_one_is_chosen() -> None:
    case = parse_matpower(CASE.replace("\t1\t3\t0\t0", "\t1\t2\t0\t0"))
    with pytest.raises(NetworkImportError, match=r"no slack node: .*bus type 3"):
        matpower_to_grid(case)
    assert matpower_to_grid(case, ImportOptions(slack="bus2")).grid["slack"] == "bus2"


def test_two_reference_buses_are_refused_unless_one_is_chosen() -> None:
    case = parse_matpower(CASE.replace("\t2\t1\t50", "\t2\t3\t50"))
    with pytest.raises(NetworkImportError, match=r"2 slack candidates \(bus1, bus2\)"):
        matpower_to_grid(case)


def test_a_phase_shift_on_a_radial_branch_is_dropped_with_a_note() -> None:
    # Without row 5 the network is radial: a shift only moves the angles downstream.
    text = CASE.replace("\t0.95\t0\t1", "\t0.95\t30\t1").replace(
        "\t1\t3\t0.02\t0.3\t0\t120.5\t0\t0\t0\t0\t1", "\t1\t3\t0.02\t0.3\t0\t120.5\t0\t0\t0\t0\t0"
    )
    imported = matpower_to_grid(parse_matpower(text))
    assert any("phase shift" in note for note in imported.notes)


def test_a_phase_shift_around_a_loop_is_refused_naming_the_branch() -> None:
    text = CASE.replace("\t0.95\t0\t1", "\t0.95\t30\t1")
    with pytest.raises(
        NetworkImportError, match=r"br\d: phase shifts add up to [+-]30 degrees around a loop"
    ):
        matpower_to_grid(parse_matpower(text))


# --------------------------------------------------------------------------------------------
# pandapower
# --------------------------------------------------------------------------------------------


def frame(rows: dict[int, dict[str, Any]]) -> dict[str, Any]:
    columns = sorted({key for row in rows.values() for key in row})
    payload = {
        "columns": columns,
        "index": list(rows),
        "data": [[row.get(c) for c in columns] for row in rows.values()],
    }
    return {
        "_module": "pandas.core.frame",
        "_class": "DataFrame",
        "_object": json.dumps(payload),
        "orient": "split",
    }


def pandapower_text(**tables: dict[int, dict[str, Any]]) -> str:
    net: dict[str, Any] = {"sn_mva": 1.0, "name": "unit", "f_hz": 50.0}
    defaults: dict[str, dict[int, dict[str, Any]]] = {
        "bus": {
            0: {"name": "MV", "vn_kv": 20.0, "in_service": True},
            1: {"name": "LV busbar", "vn_kv": 0.4, "in_service": True},
            2: {"name": "cabinet", "vn_kv": 0.4, "in_service": True},
            3: {"name": "house", "vn_kv": 0.4, "in_service": True},
        },
        "ext_grid": {0: {"bus": 0, "in_service": True}},
        "line": {
            0: {
                "from_bus": 1,
                "to_bus": 2,
                "length_km": 0.2,
                "x_ohm_per_km": 0.08,
                "r_ohm_per_km": 0.2,
                "max_i_ka": 0.27,
                "df": 1.0,
                "parallel": 1,
                "in_service": True,
                "name": "cable",
            },
            1: {
                "from_bus": 2,
                "to_bus": 3,
                "length_km": 0.03,
                "x_ohm_per_km": 0.09,
                "r_ohm_per_km": 0.6,
                "max_i_ka": 0.1,
                "df": 0.8,
                "parallel": 2,
                "in_service": True,
            },
        },
        "trafo": {
            0: {
                "hv_bus": 0,
                "lv_bus": 1,
                "sn_mva": 0.4,
                "vn_hv_kv": 20.0,
                "vn_lv_kv": 0.4,
                "vk_percent": 6.0,
                "vkr_percent": 1.0,
                "pfe_kw": 0.0,
                "i0_percent": 0.0,
                "shift_degree": 150.0,
                "tap_side": "hv",
                "tap_neutral": 0.0,
                "tap_pos": 2.0,
                "tap_step_percent": 2.5,
                "tap_step_degree": 0.0,
                "tap_changer_type": "Ratio",
                "parallel": 1,
                "df": 1.0,
                "in_service": True,
            },
        },
        "switch": {},
    }
    defaults.update(tables)
    for name, rows in defaults.items():
        net[name] = frame(rows)
    return json.dumps({"_module": "pandapower.auxiliary", "_class": "pandapowerNet", "_object": net})


def test_pandapower_lines_are_converted_to_per_unit_on_the_network_base() -> None:
    imported = pandapower_to_grid(parse_pandapower_json(pandapower_text()))
    lines = lines_by_id(imported.grid)
    base_ohm = 0.4**2 / 1.0  # (vn_kv^2 / sn_mva) at the from bus
    assert lines["line0"]["reactance_pu"] == pytest.approx(0.08 * 0.2 / base_ohm)
    assert lines["line1"]["reactance_pu"] == pytest.approx(0.09 * 0.03 / 2 / base_ohm)
    # Ratings: max_i_ka * df * parallel * sqrt(3) * vn_kv, in W.
    assert lines["line0"]["capacity_w"] == round(0.27 * math.sqrt(3) * 0.4 * 1e6)
    assert lines["line1"]["capacity_w"] == round(0.1 * 0.8 * 2 * math.sqrt(3) * 0.4 * 1e6)
    assert lines["line0"]["name"] == "cable"


def test_pandapower_transformers_take_vk_and_the_tap_ratio_and_their_rating() -> None:
    imported = pandapower_to_grid(parse_pandapower_json(pandapower_text()))
    trafo = lines_by_id(imported.grid)["trafo0"]
    z_pu = 0.06 / 0.4  # vk on the system base of 1 MVA
    r_pu = 0.01 / 0.4
    ratio = 1 + 2 * 0.025  # two steps of 2.5 % on the high-voltage side
    assert trafo["reactance_pu"] == pytest.approx(math.sqrt(z_pu**2 - r_pu**2) * ratio)
    assert trafo["transformer"] is True
    assert trafo["capacity_w"] == 400_000
    assert (trafo["from"], trafo["to"]) == ("bus0", "bus1")
    assert imported.grid["slack"] == "bus0"
    # The vector group's 150 degrees change no flow on a radial network.
    assert any("phase shift" in note for note in imported.notes)


def test_a_closed_bus_switch_fuses_buses_and_an_open_line_switch_drops_the_line() -> None:
    text = pandapower_text(
        switch={
            0: {"bus": 2, "element": 3, "et": "b", "closed": True, "z_ohm": 0.0},
            1: {"bus": 1, "element": 0, "et": "l", "closed": False, "z_ohm": 0.0},
        },
        line={
            0: {
                "from_bus": 1,
                "to_bus": 2,
                "length_km": 0.2,
                "x_ohm_per_km": 0.08,
                "max_i_ka": 0.27,
                "in_service": True,
            },
            1: {
                "from_bus": 1,
                "to_bus": 3,
                "length_km": 0.1,
                "x_ohm_per_km": 0.08,
                "max_i_ka": 0.27,
                "in_service": True,
            },
        },
    )
    imported = pandapower_to_grid(parse_pandapower_json(text))
    assert imported.node_of_bus["3"] == imported.node_of_bus["2"] == "bus2"
    assert sorted(lines_by_id(imported.grid)) == ["line1", "trafo0"]
    assert lines_by_id(imported.grid)["line1"]["to"] == "bus2"


def test_elements_the_dc_model_cannot_represent_are_refused_by_name() -> None:
    text = pandapower_text(trafo3w={5: {"hv_bus": 0, "mv_bus": 1, "lv_bus": 2, "in_service": True}})
    with pytest.raises(NetworkImportError, match="trafo3w 5: the importer does not model"):
        pandapower_to_grid(parse_pandapower_json(text))


def test_a_pandapower_network_without_ext_grid_has_no_slack() -> None:
    with pytest.raises(NetworkImportError, match="no slack node"):
        pandapower_to_grid(parse_pandapower_json(pandapower_text(ext_grid={})))


def test_a_file_that_is_not_a_pandapower_network_is_refused() -> None:
    with pytest.raises(NetworkImportError, match="not JSON"):
        parse_pandapower_json("mpc.bus = [];")
    with pytest.raises(NetworkImportError, match="no `bus` table"):
        parse_pandapower_json('{"_class": "pandapowerNet", "_object": {}}')
