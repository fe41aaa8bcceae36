"""Reading injections per node from CSV (`node_id,injection_w`), with errors that name the row and the rule."""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Callable

from services.domain.errors import InvalidArgument

HEADER = ("node_id", "injection_w")
_INTEGER = re.compile(r"[+-]?[0-9]+")


def parse_injections_csv(text: str, *, is_node: Callable[[str], bool] | None = None) -> dict[str, int]:
    """Injections in whole watts per node, positive into the grid.

    Rules, each reported with its row (the header is row 1): the header names
    `node_id` and `injection_w` (other columns are ignored); every `node_id` is
    non-empty, known to the grid when `is_node` is given, and appears once;
    every `injection_w` is an integer. Balance is checked later, against the grid.
    """
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except StopIteration:
        raise InvalidArgument(
            "the file is empty; expected the header node_id,injection_w", field="row 1"
        ) from None
    columns = [name.strip() for name in header]
    for required in HEADER:
        if required not in columns:
            raise InvalidArgument(
                f"missing column {required!r} (the header must name node_id and injection_w, got {','.join(columns)})",
                field="row 1",
            )
    node_col, value_col = columns.index("node_id"), columns.index("injection_w")
    injections: dict[str, int] = {}
    first_row_of: dict[str, int] = {}
    for row_no, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        where = f"row {row_no}"
        if len(row) <= max(node_col, value_col):
            raise InvalidArgument(f"has {len(row)} fields; the header has {len(columns)}", field=where)
        node_id = row[node_col].strip()
        raw_value = row[value_col].strip()
        if not node_id:
            raise InvalidArgument("node_id is empty", field=where)
        if is_node is not None and not is_node(node_id):
            raise InvalidArgument(f"node_id {node_id!r} is not a node of the grid", field=where)
        if node_id in first_row_of:
            raise InvalidArgument(
                f"node_id {node_id!r} appears again (first in row {first_row_of[node_id]})", field=where
            )
        if not _INTEGER.fullmatch(raw_value):
            raise InvalidArgument(f"injection_w {raw_value!r} is not an integer number of watts", field=where)
        value_w = int(raw_value)
        first_row_of[node_id] = row_no
        injections[node_id] = value_w
    return injections
