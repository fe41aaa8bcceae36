"""The meter map: which grid node each meter measures, read from CSV or YAML, checked row by row.

Readings carry a meter id but no node, so the live view needs this map. Two
forms are accepted:

CSV, a header naming `meter_id` and `node_id` (other columns are ignored)::

    meter_id,node_id
    m-0001,n3
    m-0002,n3

YAML, a list under `meters` (or a bare list) of `{meter_id, node_id}`
mappings, or a plain mapping from meter id to node id::

    meters:
      - {meter_id: m-0001, node_id: n3}
      - {meter_id: m-0002, node_id: n3}

Rules, each reported with the row or entry that breaks it: ids are non-empty,
a meter appears once, and its node is a node of the grid (when a check is
given). Several meters may share a node; their power adds up.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml

HEADER = ("meter_id", "node_id")
IsNode = Callable[[str], bool]


class MeterMapError(ValueError):
    """A meter map that breaks a rule; the message names the file's row or entry."""


def _add(meters: dict[str, str], meter_id: Any, node_id: Any, where: str, is_node: IsNode | None) -> None:
    meter = "" if meter_id is None else str(meter_id).strip()
    node = "" if node_id is None else str(node_id).strip()
    if not meter:
        raise MeterMapError(f"{where}: meter_id is empty")
    if not node:
        raise MeterMapError(f"{where}: node_id of meter {meter!r} is empty")
    if meter in meters:
        raise MeterMapError(f"{where}: meter {meter!r} appears twice")
    if is_node is not None and not is_node(node):
        raise MeterMapError(f"{where}: node_id {node!r} of meter {meter!r} is not a node of the grid")
    meters[meter] = node


def parse_meter_map_csv(text: str, *, is_node: IsNode | None = None) -> dict[str, str]:
    """Meter id → node id from CSV with a `meter_id,node_id` header (the header is row 1)."""
    reader = csv.reader(io.StringIO(text))
    try:
        header = [name.strip() for name in next(reader)]
    except StopIteration:
        raise MeterMapError("row 1: the file is empty; expected the header meter_id,node_id") from None
    for required in HEADER:
        if required not in header:
            raise MeterMapError(
                f"row 1: missing column {required!r} (the header must name meter_id and node_id, "
                f"got {','.join(header)})"
            )
    meter_col, node_col = header.index("meter_id"), header.index("node_id")
    meters: dict[str, str] = {}
    for row_no, row in enumerate(reader, start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) <= max(meter_col, node_col):
            raise MeterMapError(f"row {row_no}: has {len(row)} fields; the header has {len(header)}")
        _add(meters, row[meter_col], row[node_col], f"row {row_no}", is_node)
    return meters


def parse_meter_map_yaml(data: Any, *, is_node: IsNode | None = None) -> dict[str, str]:
    """Meter id → node id from parsed YAML (see the module docstring for the accepted forms)."""
    if isinstance(data, Mapping) and set(data) == {"meters"}:
        data = data["meters"]
    meters: dict[str, str] = {}
    if data is None:
        return meters
    if isinstance(data, Mapping):
        for meter_id, node_id in data.items():
            _add(meters, meter_id, node_id, f"meter {meter_id!r}", is_node)
        return meters
    if not isinstance(data, list):
        raise MeterMapError("must be a list of {meter_id, node_id} mappings or a meter_id: node_id mapping")
    for index, entry in enumerate(data):
        where = f"meters[{index}]"
        if not isinstance(entry, Mapping):
            raise MeterMapError(f"{where}: must be a mapping with meter_id and node_id, got {entry!r}")
        _add(meters, entry.get("meter_id"), entry.get("node_id"), where, is_node)
    return meters


def load_meter_map(path: str | Path, *, is_node: IsNode | None = None) -> dict[str, str]:
    """Read a meter map file: CSV when the name ends in `.csv`, YAML otherwise."""
    source = Path(path)
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise MeterMapError(f"cannot read {source}: {exc.strerror or exc}") from None
    try:
        if source.suffix.lower() == ".csv":
            return parse_meter_map_csv(text, is_node=is_node)
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise MeterMapError(f"not valid YAML: {exc}") from None
        return parse_meter_map_yaml(data, is_node=is_node)
    except MeterMapError as exc:
        raise MeterMapError(f"{source}: {exc}") from None
