"""The distribution grid as the market sees it: nodes, lines with limits, the slack, and DC power-flow PTDFs.

A grid is loaded from a YAML (or any mapping) of this form; more fields may be
present and are kept as they are:

    interval_minutes: 15              # length of a delivery interval
    price_tick_micro_per_kwh: 100     # every order price is a multiple of this
    slack: n0                         # the reference node (the connection to the upstream grid)
    nodes: [{id: n0}, {id: n1}, {id: n2}]
    lines:
      - {id: l1, from: n0, to: n1, capacity_w: 50000, reactance_pu: 0.01}
      - {id: l2, from: n1, to: n2, capacity_w: 20000}

Rules (each violation raises `ConsistencyError` naming the element and the rule):

- `interval_minutes` and `price_tick_micro_per_kwh` are positive integers;
- node ids and line ids are unique, non-empty strings (integers are read as
  their decimal text);
- `slack` is one of the nodes;
- a line joins two different, known nodes and has `capacity_w`, a whole
  number of watts >= 0. `capacity_w: 0` is allowed and means the line may
  carry nothing (it still exists physically, so on a loop it shapes the PTDFs
  and the market must keep its flow at zero); a line without `capacity_w` is
  rejected;
- `reactance_pu`, where given, is a finite non-zero number. It is required on
  every line that lies on a loop (parallel lines form a loop). A line that is
  not on any loop (a bridge, e.g. every line of a radial feeder) needs none:
  its flow is the net injection on its far side whatever its reactance;
- every node is connected to the slack through lines.

Optional fields: a line's `transformer: true` marks a transformer branch, and
a line's or node's other fields (`name`, `vn_kv`, ...) are carried through.
A `utility` mapping describes the upstream utility at its connection point:

    utility: {node: n0, retail_price_per_kwh: "0.30", feed_in_price_per_kwh: "0.08", capacity_w: 400000}

(`node` defaults to the slack; prices on the tick, feed-in <= retail;
capacity_w is the transformer's). The market turns it into standing orders,
so the local price always lies between the two tariffs.

Flows are DC and lossless. `ptdf()` is the power transfer distribution factor
matrix, lines x nodes: entry (l, n) is the flow on line l (positive from its
`from` node to its `to` node) caused by injecting one unit at node n and
withdrawing it at the slack. The slack's column is zero; flows of any
injection vector are `ptdf() @ injections` (whatever the vector does not
balance is taken up by the slack). Rows of bridges are exactly 0, +1 or -1,
so flows on a radial feeder of whole-Wh injections are whole Wh.

A line's limit over one interval is `capacity_w * interval_minutes / 60` Wh
(`line_limit_wh`, exact as a Fraction): with 15-minute intervals 50,000 W
allow 12,500 Wh.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from services.domain.units import UnitError, price_decimal_from_micro, price_micro_from_decimal

FloatArray = npt.NDArray[np.float64]

MINUTES_PER_HOUR = 60


class ConsistencyError(ValueError):
    """A grid that breaks a rule; `element` names the node, line or field, `rule` says what is wrong."""

    def __init__(self, element: str, rule: str) -> None:
        super().__init__(f"{element}: {rule}")
        self.element = element
        self.rule = rule


@dataclass(frozen=True, slots=True)
class Node:
    """A bus of the grid; `extra` keeps the file's other fields."""

    id: str
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Line:
    """A branch between two nodes with its thermal limit and, where it matters, its reactance."""

    id: str
    from_node: str
    to_node: str
    capacity_w: int
    reactance_pu: float | None = None
    transformer: bool = False
    extra: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Utility:
    """The upstream utility at its connection point: it sells at the retail tariff and buys at the
    feed-in tariff, up to the transformer's capacity in either direction."""

    node: str
    retail_price_micro_per_kwh: int
    feed_in_price_micro_per_kwh: int
    capacity_w: int


@dataclass(frozen=True, eq=False)
class Grid:
    """A validated network; build it with `grid_from_dict` or `load_grid`, which check every rule."""

    nodes: tuple[Node, ...]
    lines: tuple[Line, ...]
    slack: str
    interval_minutes: int
    price_tick_micro_per_kwh: int
    extra: Mapping[str, Any] = field(default_factory=dict)
    utility: Utility | None = None

    @cached_property
    def node_ids(self) -> tuple[str, ...]:
        return tuple(node.id for node in self.nodes)

    @cached_property
    def line_ids(self) -> tuple[str, ...]:
        return tuple(line.id for line in self.lines)

    @cached_property
    def node_index(self) -> Mapping[str, int]:
        """Position of each node id in `nodes` (and in the PTDF's columns)."""
        return {node_id: i for i, node_id in enumerate(self.node_ids)}

    @cached_property
    def line_index(self) -> Mapping[str, int]:
        """Position of each line id in `lines` (and in the PTDF's rows)."""
        return {line_id: i for i, line_id in enumerate(self.line_ids)}

    @property
    def slack_index(self) -> int:
        return self.node_index[self.slack]

    @property
    def interval_s(self) -> int:
        return self.interval_minutes * 60

    def line_limit_wh(self, line: int | str) -> Fraction:
        """What the line may carry over one interval, in Wh, exactly: capacity_w * interval_minutes / 60."""
        index = self.line_index[line] if isinstance(line, str) else line
        return Fraction(self.lines[index].capacity_w * self.interval_minutes, MINUTES_PER_HOUR)

    @cached_property
    def line_limits_wh(self) -> FloatArray:
        """Every line's limit over one interval in Wh, as floats (exact up to 2**53 / 60 W)."""
        limits = np.array(
            [line.capacity_w * self.interval_minutes / MINUTES_PER_HOUR for line in self.lines],
            dtype=np.float64,
        )
        limits.setflags(write=False)
        return limits

    @cached_property
    def capacities_w(self) -> npt.NDArray[np.int64]:
        capacities = np.array([line.capacity_w for line in self.lines], dtype=np.int64)
        capacities.setflags(write=False)
        return capacities

    @cached_property
    def bridges(self) -> npt.NDArray[np.bool_]:
        """True for each line that lies on no loop (its flow follows from the injections alone)."""
        mask = np.zeros(len(self.lines), dtype=bool)
        for index in self._tree.bridges:
            mask[index] = True
        mask.setflags(write=False)
        return mask

    @cached_property
    def _tree(self) -> _SpanningTree:
        return _spanning_tree(len(self.nodes), self._endpoints, self.node_index[self.slack])

    def search_tree(self) -> tuple[list[int], list[int]]:
        """Nodes in depth-first order from the slack, and for each node the line it was reached by (-1 for the slack).

        On a radial network this is the feeder's tree: every line joins a node
        to the one it was reached from, and each node's subtree follows it in
        the order.
        """
        return list(self._tree.preorder), list(self._tree.entry_line)

    @property
    def is_radial(self) -> bool:
        """True when no line lies on a loop: flows of whole-Wh injections are then whole Wh."""
        return bool(np.all(self.bridges))

    @cached_property
    def _endpoints(self) -> list[tuple[int, int]]:
        index = self.node_index
        return [(index[line.from_node], index[line.to_node]) for line in self.lines]

    def ptdf(self) -> FloatArray:
        """The PTDF matrix, lines x nodes, relative to the slack (read-only, computed once)."""
        return self._ptdf

    @cached_property
    def _ptdf(self) -> FloatArray:
        matrix = _compute_ptdf(self)
        matrix.setflags(write=False)
        return matrix

    def flows(self, injections: npt.ArrayLike) -> FloatArray:
        """Line flows (positive from `from` to `to`) for net injections per node, in the injections' unit."""
        vector = np.asarray(injections, dtype=np.float64)
        if vector.shape[0] != len(self.nodes):
            raise ValueError(f"expected {len(self.nodes)} injections (one per node), got {vector.shape[0]}")
        return self.ptdf() @ vector

    def flows_w(self, injections_w: npt.ArrayLike) -> FloatArray:
        """Line flows in W for net injections per node in W (positive into the grid)."""
        return self.flows(injections_w)

    def flows_wh(self, injections_wh: npt.ArrayLike) -> FloatArray:
        """Line energy flows in Wh over one interval for net injections per node in Wh."""
        return self.flows(injections_wh)

    def power_w_from_energy_wh(self, energy_wh: npt.ArrayLike) -> FloatArray:
        """Average power over one interval of an energy: Wh * 60 / interval_minutes."""
        return np.asarray(energy_wh, dtype=np.float64) * (MINUTES_PER_HOUR / self.interval_minutes)


def load_grid(path: str | Path) -> Grid:
    """Read and validate a grid YAML file."""
    import yaml  # only here, so that pure users of the model do not pay for it

    source = Path(path)
    try:
        data = yaml.safe_load(source.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConsistencyError(str(source), f"not valid YAML: {exc}") from exc
    return grid_from_dict(data)


def grid_from_dict(data: Any) -> Grid:
    """Validate a grid given as plain data (the YAML form) and build it."""
    if not isinstance(data, Mapping):
        raise ConsistencyError(
            "grid", "must be a mapping with interval_minutes, price_tick_micro_per_kwh, slack, nodes, lines"
        )
    interval_minutes = _positive_int(data, "interval_minutes")
    tick = _positive_int(data, "price_tick_micro_per_kwh")

    raw_nodes = data.get("nodes")
    if not isinstance(raw_nodes, Sequence) or isinstance(raw_nodes, str) or not raw_nodes:
        raise ConsistencyError("nodes", "must be a non-empty list of {id: ...}")
    nodes: list[Node] = []
    seen_nodes: set[str] = set()
    for position, raw in enumerate(raw_nodes):
        where = f"nodes[{position}]"
        if not isinstance(raw, Mapping):
            raise ConsistencyError(where, "must be a mapping with an id")
        node_id = _identifier(raw.get("id"), f"{where}.id")
        if node_id in seen_nodes:
            raise ConsistencyError(f"node {node_id}", "duplicate node id")
        seen_nodes.add(node_id)
        nodes.append(Node(node_id, {k: v for k, v in raw.items() if k != "id"}))

    if "slack" not in data:
        raise ConsistencyError("slack", "is missing: one node must be the slack (reference) node")
    slack = _identifier(data.get("slack"), "slack")
    if slack not in seen_nodes:
        raise ConsistencyError("slack", f"{slack!r} is not one of the nodes")

    raw_lines = data.get("lines", [])
    if raw_lines is None:
        raw_lines = []
    if not isinstance(raw_lines, Sequence) or isinstance(raw_lines, str):
        raise ConsistencyError("lines", "must be a list of lines")
    lines: list[Line] = []
    seen_lines: set[str] = set()
    for position, raw in enumerate(raw_lines):
        lines.append(_line_from_dict(raw, position, seen_nodes, seen_lines))

    utility = (
        _utility_from_dict(data["utility"], seen_nodes, slack, tick)
        if data.get("utility") is not None
        else None
    )
    extra = {
        k: v
        for k, v in data.items()
        if k not in {"interval_minutes", "price_tick_micro_per_kwh", "slack", "nodes", "lines", "utility"}
    }
    grid = Grid(tuple(nodes), tuple(lines), slack, interval_minutes, tick, extra, utility)
    _check_connected(grid)
    _check_loop_reactances(grid)
    return grid


def grid_to_dict(grid: Grid) -> dict[str, Any]:
    """The YAML form of a grid (what `grid_from_dict` reads back to an equal grid)."""
    lines: list[dict[str, Any]] = []
    for line in grid.lines:
        entry: dict[str, Any] = {
            "id": line.id,
            "from": line.from_node,
            "to": line.to_node,
            "capacity_w": line.capacity_w,
        }
        if line.reactance_pu is not None:
            entry["reactance_pu"] = line.reactance_pu
        if line.transformer:
            entry["transformer"] = True
        entry.update(line.extra)
        lines.append(entry)
    result: dict[str, Any] = {
        "interval_minutes": grid.interval_minutes,
        "price_tick_micro_per_kwh": grid.price_tick_micro_per_kwh,
        "slack": grid.slack,
        "nodes": [{"id": node.id, **node.extra} for node in grid.nodes],
        "lines": lines,
    }
    if grid.utility is not None:
        result["utility"] = {
            "node": grid.utility.node,
            "retail_price_per_kwh": _price_text(grid.utility.retail_price_micro_per_kwh),
            "feed_in_price_per_kwh": _price_text(grid.utility.feed_in_price_micro_per_kwh),
            "capacity_w": grid.utility.capacity_w,
        }
    result.update(grid.extra)
    return result


def _price_text(price_micro_per_kwh: int) -> str:
    text = format(price_decimal_from_micro(price_micro_per_kwh), "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def _utility_from_dict(raw: Any, node_ids: set[str], slack: str, tick: int) -> Utility:
    if not isinstance(raw, Mapping):
        raise ConsistencyError(
            "utility", "must be a mapping with retail_price_per_kwh, feed_in_price_per_kwh, capacity_w"
        )
    node = _identifier(raw.get("node", slack), "utility.node")
    if node not in node_ids:
        raise ConsistencyError("utility", f"node {node!r} is not one of the nodes")
    prices: dict[str, int] = {}
    for key in ("retail_price_per_kwh", "feed_in_price_per_kwh"):
        if key not in raw or isinstance(raw[key], bool):
            raise ConsistencyError("utility", f"{key} is missing (a price in currency per kWh)")
        try:
            prices[key] = price_micro_from_decimal(str(raw[key]), field=f"utility.{key}")
        except UnitError as exc:
            raise ConsistencyError("utility", str(exc)) from None
        if prices[key] % tick:
            raise ConsistencyError(
                "utility", f"{key} {raw[key]} is not on the market's tick of {tick} micro per kWh"
            )
    if prices["feed_in_price_per_kwh"] > prices["retail_price_per_kwh"]:
        raise ConsistencyError("utility", "feed_in_price_per_kwh must not exceed retail_price_per_kwh")
    capacity = raw.get("capacity_w")
    if isinstance(capacity, float) and capacity.is_integer():
        capacity = int(capacity)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 0:
        raise ConsistencyError(
            "utility", f"capacity_w must be a whole number of watts >= 0, got {capacity!r}"
        )
    return Utility(node, prices["retail_price_per_kwh"], prices["feed_in_price_per_kwh"], capacity)


def _positive_int(data: Mapping[str, Any], key: str) -> int:
    if key not in data:
        raise ConsistencyError(key, "is missing")
    value = data[key]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConsistencyError(key, f"must be a positive whole number, got {value!r}")
    return value


def _identifier(value: Any, where: str) -> str:
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ConsistencyError(where, f"must be a non-empty string, got {value!r}")
    text = str(value)
    if not text.strip():
        raise ConsistencyError(where, "must be a non-empty string")
    return text


def _line_from_dict(raw: Any, position: int, node_ids: set[str], seen: set[str]) -> Line:
    where = f"lines[{position}]"
    if not isinstance(raw, Mapping):
        raise ConsistencyError(where, "must be a mapping with id, from, to, capacity_w")
    line_id = _identifier(raw.get("id"), f"{where}.id")
    element = f"line {line_id}"
    if line_id in seen:
        raise ConsistencyError(element, "duplicate line id")
    seen.add(line_id)
    ends: list[str] = []
    for key in ("from", "to"):
        if key not in raw:
            raise ConsistencyError(element, f"'{key}' is missing")
        node_id = _identifier(raw[key], f"{element}.{key}")
        if node_id not in node_ids:
            raise ConsistencyError(element, f"'{key}' names unknown node {node_id!r}")
        ends.append(node_id)
    if ends[0] == ends[1]:
        raise ConsistencyError(element, f"joins node {ends[0]!r} to itself")
    if "capacity_w" not in raw or raw["capacity_w"] is None:
        raise ConsistencyError(
            element, "capacity_w is missing: every line needs a capacity (0 means it may carry nothing)"
        )
    capacity = raw["capacity_w"]
    if isinstance(capacity, float) and capacity.is_integer():
        capacity = int(capacity)
    if isinstance(capacity, bool) or not isinstance(capacity, int):
        raise ConsistencyError(
            element, f"capacity_w must be a whole number of watts, got {raw['capacity_w']!r}"
        )
    if capacity < 0:
        raise ConsistencyError(element, f"capacity_w must not be negative, got {capacity}")
    reactance = raw.get("reactance_pu")
    if reactance is not None:
        if isinstance(reactance, bool) or not isinstance(reactance, int | float):
            raise ConsistencyError(element, f"reactance_pu must be a number, got {reactance!r}")
        reactance = float(reactance)
        if not math.isfinite(reactance) or reactance == 0.0:
            raise ConsistencyError(element, f"reactance_pu must be finite and non-zero, got {reactance!r}")
    transformer = raw.get("transformer", False)
    if not isinstance(transformer, bool):
        raise ConsistencyError(element, f"transformer must be true or false, got {transformer!r}")
    known = {"id", "from", "to", "capacity_w", "reactance_pu", "transformer"}
    extra = {k: v for k, v in raw.items() if k not in known}
    return Line(line_id, ends[0], ends[1], capacity, reactance, transformer, extra)


def _adjacency(node_count: int, endpoints: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
    adjacency: list[list[tuple[int, int]]] = [[] for _ in range(node_count)]
    for edge, (a, b) in enumerate(endpoints):
        adjacency[a].append((b, edge))
        adjacency[b].append((a, edge))
    return adjacency


def _check_connected(grid: Grid) -> None:
    adjacency = _adjacency(len(grid.nodes), grid._endpoints)
    reached = [False] * len(grid.nodes)
    reached[grid.slack_index] = True
    queue = deque([grid.slack_index])
    while queue:
        current = queue.popleft()
        for neighbour, _edge in adjacency[current]:
            if not reached[neighbour]:
                reached[neighbour] = True
                queue.append(neighbour)
    for index, ok in enumerate(reached):
        if not ok:
            raise ConsistencyError(
                f"node {grid.nodes[index].id}",
                f"is islanded: no path of lines joins it to the slack {grid.slack!r}",
            )


def _check_loop_reactances(grid: Grid) -> None:
    for index, line in enumerate(grid.lines):
        if line.reactance_pu is None and not grid.bridges[index]:
            loop = _loop_through(grid, index)
            raise ConsistencyError(
                f"line {line.id}",
                "reactance_pu is missing, but the line lies on a loop "
                f"({', '.join(loop)}); flows on a loop split by reactance",
            )


def _loop_through(grid: Grid, line_index: int) -> list[str]:
    """Line ids of one loop through `line_index` (a shortest path between its ends that avoids it)."""
    start, goal = grid._endpoints[line_index]
    adjacency = _adjacency(len(grid.nodes), grid._endpoints)
    came_from: dict[int, tuple[int, int]] = {start: (-1, -1)}
    queue = deque([start])
    while queue and goal not in came_from:
        current = queue.popleft()
        for neighbour, edge in adjacency[current]:
            if edge != line_index and neighbour not in came_from:
                came_from[neighbour] = (current, edge)
                queue.append(neighbour)
    loop = [grid.lines[line_index].id]
    node = goal
    while node != start and node in came_from:
        previous, edge = came_from[node]
        loop.append(grid.lines[edge].id)
        node = previous
    return loop


@dataclass(frozen=True, slots=True)
class _SpanningTree:
    """A depth-first search from the slack: which lines are bridges and which nodes hang below each."""

    bridges: list[int]
    # For each bridge, the node on its far side from the slack.
    far_node: dict[int, int]
    # Nodes in preorder; the nodes below node n are preorder[pre[n] : pre[n] + size[n]].
    preorder: list[int]
    # The line each node was first reached by (-1 for roots).
    entry_line: list[int]
    pre: list[int]
    size: list[int]


def _spanning_tree(node_count: int, endpoints: Sequence[tuple[int, int]], root: int) -> _SpanningTree:
    """Tarjan's low-link bridges from an iterative DFS rooted at `root` (parallel edges form cycles)."""
    adjacency = _adjacency(node_count, endpoints)
    pre = [-1] * node_count
    low = [0] * node_count
    size = [1] * node_count
    entry_line = [-1] * node_count
    preorder: list[int] = []
    bridges: list[int] = []
    far_node: dict[int, int] = {}
    roots = [root] + [n for n in range(node_count) if n != root]
    for start in roots:
        if pre[start] != -1:
            continue
        pre[start] = low[start] = len(preorder)
        preorder.append(start)
        # Each frame: node, the edge it was entered by, and the position in its adjacency list.
        stack: list[tuple[int, int, int]] = [(start, -1, 0)]
        while stack:
            node, via, position = stack[-1]
            if position < len(adjacency[node]):
                stack[-1] = (node, via, position + 1)
                neighbour, edge = adjacency[node][position]
                if edge == via:
                    continue
                if pre[neighbour] == -1:
                    pre[neighbour] = low[neighbour] = len(preorder)
                    entry_line[neighbour] = edge
                    preorder.append(neighbour)
                    stack.append((neighbour, edge, 0))
                else:
                    low[node] = min(low[node], pre[neighbour])
            else:
                stack.pop()
                if stack:
                    parent = stack[-1][0]
                    low[parent] = min(low[parent], low[node])
                    size[parent] += size[node]
                    if low[node] > pre[parent]:
                        bridges.append(via)
                        far_node[via] = node
    return _SpanningTree(sorted(bridges), far_node, preorder, entry_line, pre, size)


def _compute_ptdf(grid: Grid) -> FloatArray:
    node_count = len(grid.nodes)
    line_count = len(grid.lines)
    matrix = np.zeros((line_count, node_count), dtype=np.float64)
    if line_count == 0:
        return matrix
    bridges = grid.bridges
    slack = grid.slack_index

    # A bridge's flow is the net injection of the side without the slack (the
    # nodes below its far end in the search tree), so its row is exact: +1 on
    # that side if it holds the line's `from` node (power leaves from -> to),
    # -1 if it holds the `to` node.
    tree = grid._tree
    preorder = np.array(tree.preorder, dtype=np.int64)
    for index in tree.bridges:
        far = tree.far_node[index]
        below = preorder[tree.pre[far] : tree.pre[far] + tree.size[far]]
        sign = 1.0 if grid._endpoints[index][0] == far else -1.0
        matrix[index, below] = sign

    meshed = np.flatnonzero(~bridges)
    if meshed.size:
        # Susceptance matrix B = A^T diag(1/x) A over all lines; bridges without
        # a reactance get 1, which changes no flow on any loop.
        reactances = np.array(
            [line.reactance_pu if line.reactance_pu is not None else 1.0 for line in grid.lines],
            dtype=np.float64,
        )
        incidence = np.zeros((line_count, node_count), dtype=np.float64)
        ends = np.array(grid._endpoints, dtype=np.int64)
        incidence[np.arange(line_count), ends[:, 0]] = 1.0
        incidence[np.arange(line_count), ends[:, 1]] = -1.0
        weighted = incidence / reactances[:, None]
        susceptance = incidence.T @ weighted
        keep = np.array([n for n in range(node_count) if n != slack], dtype=np.int64)
        reduced = susceptance[np.ix_(keep, keep)]
        try:
            # PTDF rows = diag(1/x) A_red B_red^-1; B_red is symmetric.
            rows = np.linalg.solve(reduced, weighted[np.ix_(meshed, keep)].T).T
        except np.linalg.LinAlgError as exc:
            raise ConsistencyError(
                "lines", "the network's susceptance matrix is singular (check negative reactances)"
            ) from exc
        rows[np.abs(rows) < 1e-12] = 0.0
        matrix[np.ix_(meshed, keep)] = rows
    return matrix
