"""The meter map: CSV and YAML forms, and errors that name the row or entry and the rule."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from services.grid_check.domain.meters import (
    MeterMapError,
    load_meter_map,
    parse_meter_map_csv,
    parse_meter_map_yaml,
)

NODES = {"n0", "n1", "n2"}


def test_csv_maps_meters_to_nodes_and_several_meters_may_share_a_node() -> None:
    text = "site,meter_id,node_id\nhouse 1,m1,n1\nhouse 2, m2 ,n1\n\nshop,m3,n2\n"
    assert parse_meter_map_csv(text, is_node=NODES.__contains__) == {"m1": "n1", "m2": "n1", "m3": "n2"}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "row 1: the file is empty"),
        ("meter,node_id\nm1,n1\n", "row 1: missing column 'meter_id'"),
        ("meter_id,node_id\nm1\n", "row 2: has 1 fields; the header has 2"),
        ("meter_id,node_id\nm1,n1\nm1,n2\n", "row 3: meter 'm1' appears twice"),
        ("meter_id,node_id\nm1,n7\n", "row 2: node_id 'n7' of meter 'm1' is not a node of the grid"),
        ("meter_id,node_id\n,n1\n", "row 2: meter_id is empty"),
        ("meter_id,node_id\nm1, \n", "row 2: node_id of meter 'm1' is empty"),
    ],
)
def test_a_bad_csv_row_is_named_with_the_rule_it_breaks(text: str, message: str) -> None:
    with pytest.raises(MeterMapError) as info:
        parse_meter_map_csv(text, is_node=NODES.__contains__)
    assert str(info.value).startswith(message)


@pytest.mark.parametrize(
    "data",
    [
        {"meters": [{"meter_id": "m1", "node_id": "n1"}, {"meter_id": "m2", "node_id": "n2"}]},
        [{"meter_id": "m1", "node_id": "n1"}, {"meter_id": "m2", "node_id": "n2"}],
        {"m1": "n1", "m2": "n2"},
        {"meters": {"m1": "n1", "m2": "n2"}},
    ],
)
def test_yaml_accepts_a_list_of_entries_or_a_plain_mapping(data: object) -> None:
    assert parse_meter_map_yaml(data, is_node=NODES.__contains__) == {"m1": "n1", "m2": "n2"}


def test_yaml_errors_name_the_entry() -> None:
    with pytest.raises(MeterMapError, match=r"meters\[1\]: node_id 'n9' of meter 'm2' is not a node"):
        parse_meter_map_yaml(
            {"meters": [{"meter_id": "m1", "node_id": "n1"}, {"meter_id": "m2", "node_id": "n9"}]},
            is_node=NODES.__contains__,
        )
    with pytest.raises(MeterMapError, match=r"meters\[0\]: must be a mapping"):
        parse_meter_map_yaml({"meters": ["m1"]})
    with pytest.raises(MeterMapError, match="must be a list"):
        parse_meter_map_yaml("m1")


def test_load_picks_the_form_by_file_name_and_names_the_file_in_errors(tmp_path: Path) -> None:
    csv_path = tmp_path / "meters.csv"
    csv_path.write_text("meter_id,node_id\nm1,n1\n")
    yaml_path = tmp_path / "meters.yaml"
    yaml_path.write_text("meters:\n  - {meter_id: m1, node_id: n2}\n")
    assert load_meter_map(csv_path) == {"m1": "n1"}
    assert load_meter_map(yaml_path) == {"m1": "n2"}
    with pytest.raises(MeterMapError, match=f"^cannot read {re.escape(str(tmp_path / 'missing.csv'))}: "):
        load_meter_map(tmp_path / "missing.csv")
    bad = tmp_path / "bad.yaml"
    bad.write_text("meters: [\n")
    with pytest.raises(MeterMapError, match=f"^{re.escape(str(bad))}: not valid YAML"):
        load_meter_map(bad)
