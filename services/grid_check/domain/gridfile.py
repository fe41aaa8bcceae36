"""Grid files for grid_check: load a grid into a flow model, write the YAML form readably, read limit files."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from services.domain.grid import Grid, grid_from_dict, grid_to_dict, load_grid
from services.grid_check.domain.limits import LimitSchedule, limits_from_dicts
from services.grid_check.domain.network import FlowModel, LineSpec

# Scalars first, then the two lists, so a file reads top-down.
_LIST_KEYS = ("nodes", "lines")


class GridFileError(ValueError):
    """A grid or limits file that cannot be read; the message names the file and what is wrong."""


def flow_model_of(grid: Grid) -> FlowModel:
    """The flow model of a validated grid (its PTDFs are computed here, once)."""
    return FlowModel(
        node_ids=grid.node_ids,
        slack=grid.slack,
        lines=[
            LineSpec(
                line_id=line.id,
                from_node=line.from_node,
                to_node=line.to_node,
                capacity_w=line.capacity_w,
                transformer=line.transformer,
            )
            for line in grid.lines
        ],
        ptdf=grid.ptdf(),
    )


def flow_model_from_dict(data: Mapping[str, Any]) -> FlowModel:
    """Validate a grid in its YAML form (raises `ConsistencyError`) and build its flow model."""
    return flow_model_of(grid_from_dict(data))


def load_flow_model(path: str | Path) -> FlowModel:
    """Read and validate a grid YAML file and build its flow model."""
    return flow_model_of(load_grid(path))


def grid_dict_checked(data: Mapping[str, Any]) -> dict[str, Any]:
    """Validate a grid in its YAML form and return it as the grid model writes it back."""
    return grid_to_dict(grid_from_dict(data))


def _flow_item(item: Any) -> str:
    text: str = yaml.safe_dump(
        item, default_flow_style=True, sort_keys=False, width=1 << 30, allow_unicode=True
    )
    return text.strip()


def dump_grid_yaml(data: Mapping[str, Any], *, header: Iterable[str] = ()) -> str:
    """The YAML form with one node or line per line, like the documented example.

    Floats are written with Python's shortest round-trip representation, so
    reading the file back gives exactly the same reactances.
    """
    out = [f"# {line}" for text in header for line in text.splitlines()]
    scalars = {k: v for k, v in data.items() if k not in _LIST_KEYS}
    if scalars:
        out.append(yaml.safe_dump(scalars, sort_keys=False, allow_unicode=True, width=1 << 30).rstrip())
    for key in _LIST_KEYS:
        items = data.get(key) or []
        out.append(f"{key}:")
        out.extend(f"  - {_flow_item(item)}" for item in items)
    return "\n".join(out) + "\n"


def load_limits_yaml(path: str | Path, *, ratings_w: Mapping[str, int]) -> LimitSchedule:
    """Read a limits file: a YAML list (or `{limits: [...]}`) of {line_id, start_s, until_s, capacity_w, reason}."""
    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise GridFileError(f"not valid YAML: {exc}") from None
    if isinstance(data, Mapping):
        data = data.get("limits")
    if data is None:
        return LimitSchedule()
    if not isinstance(data, list) or not all(isinstance(entry, Mapping) for entry in data):
        raise GridFileError("must be a list of {line_id, start_s, until_s, capacity_w, reason} mappings")
    return limits_from_dicts(data, ratings_w=ratings_w)
