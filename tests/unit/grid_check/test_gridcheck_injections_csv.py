"""The injections CSV of `p2pgrid grid flows`: every bad row is named with the rule it breaks."""

from __future__ import annotations

import pytest

from services.domain.errors import InvalidArgument
from services.grid_check.domain.injections import parse_injections_csv

NODES = {"n0", "n1", "n2"}


def parse(text: str) -> dict[str, int]:
    return parse_injections_csv(text, is_node=NODES.__contains__)


def test_rows_become_whole_watts_per_node_and_extra_columns_and_blank_lines_are_ignored() -> None:
    text = "note,injection_w,node_id\nroof,1500,n1\n\nheat pump,-1500,n2\n"
    assert parse(text) == {"n1": 1500, "n2": -1500}


@pytest.mark.parametrize(
    ("text", "row", "rule"),
    [
        ("", "row 1", "empty"),
        ("node,injection_w\nn1,5\n", "row 1", "missing column 'node_id'"),
        ("node_id,power\nn1,5\n", "row 1", "missing column 'injection_w'"),
        ("node_id,injection_w\nn1,5\nn7,-5\n", "row 3", "'n7' is not a node"),
        ("node_id,injection_w\nn1,1.5\n", "row 2", "not an integer"),
        ("node_id,injection_w\nn1,1e3\n", "row 2", "not an integer"),
        ("node_id,injection_w\nn1,\n", "row 2", "not an integer"),
        ("node_id,injection_w\n,5\n", "row 2", "node_id is empty"),
        ("node_id,injection_w\nn1,5\nn2,1\nn1,-6\n", "row 4", "appears again (first in row 2)"),
        ("node_id,injection_w\nn1\n", "row 2", "has 1 fields"),
    ],
)
def test_bad_input_names_the_row_and_the_rule(text: str, row: str, rule: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse(text)
    assert caught.value.field == row
    assert rule in caught.value.message
