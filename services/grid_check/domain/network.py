"""The flow model grid_check computes with: lines, ratings and PTDFs of one grid, and flows from injections.

Built once per topology from the shared grid model. Injections are in watts,
positive into the grid; a flow is positive from the line's `from` node to its
`to` node. Injections must balance (sum to zero); the slack node's own entry
is where any imbalance goes when the caller asks the slack to balance.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from services.domain.errors import InvalidArgument

# Injections must sum to zero within this many watts (the CLI's documented rule).
BALANCE_TOLERANCE_W = 1.0


@dataclass(frozen=True, slots=True)
class LineSpec:
    """A line as grid_check sees it."""

    line_id: str
    from_node: str
    to_node: str
    capacity_w: int
    transformer: bool = False


class FlowModel:
    """Lines, ratings and the PTDF matrix (lines x nodes, relative to the slack) of one grid."""

    def __init__(
        self,
        *,
        node_ids: Sequence[str],
        slack: str,
        lines: Sequence[LineSpec],
        ptdf: npt.ArrayLike,
    ) -> None:
        matrix = np.asarray(ptdf, dtype=np.float64)
        if matrix.shape != (len(lines), len(node_ids)):
            raise ValueError(
                f"PTDF has shape {matrix.shape}, expected {(len(lines), len(node_ids))} (lines x nodes)"
            )
        if slack not in node_ids:
            raise ValueError(f"slack {slack!r} is not a node")
        self.node_ids: tuple[str, ...] = tuple(node_ids)
        self.slack = slack
        self.lines: tuple[LineSpec, ...] = tuple(lines)
        self.ptdf: npt.NDArray[np.float64] = matrix
        self.ptdf.setflags(write=False)
        self._node_index = {node_id: i for i, node_id in enumerate(self.node_ids)}
        self.line_ids: tuple[str, ...] = tuple(line.line_id for line in self.lines)
        self.line_index = {line_id: i for i, line_id in enumerate(self.line_ids)}
        self.ratings_w: dict[str, int] = {line.line_id: line.capacity_w for line in self.lines}

    def has_node(self, node_id: str) -> bool:
        return node_id in self._node_index

    def injection_vector(
        self, injections_w: Mapping[str, float], *, slack_balances: bool = False
    ) -> npt.NDArray[np.float64]:
        """Injections as a vector in node order, checked for unknown nodes and balance.

        With `slack_balances` the slack node takes whatever makes the sum zero
        (added to any injection given for it); otherwise a sum further than
        `BALANCE_TOLERANCE_W` from zero is rejected.
        """
        vector = np.zeros(len(self.node_ids), dtype=np.float64)
        for node_id, value_w in injections_w.items():
            index = self._node_index.get(node_id)
            if index is None:
                raise InvalidArgument(f"{node_id!r} is not a node of the grid", field="node_id")
            if not math.isfinite(value_w):
                raise InvalidArgument(
                    f"injection of {node_id!r} is not finite: {value_w!r}", field="injection_w"
                )
            vector[index] += value_w
        total_w = float(math.fsum(vector.tolist()))
        if slack_balances:
            vector[self._node_index[self.slack]] -= total_w
        elif abs(total_w) > BALANCE_TOLERANCE_W:
            raise InvalidArgument(
                f"injections sum to {total_w:.3f} W; they must sum to zero within {BALANCE_TOLERANCE_W:g} W "
                "(or let the slack node balance them)",
                field="injections",
            )
        return vector

    def flows_w(self, vector: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Line flows for a balanced injection vector in node order."""
        flows: npt.NDArray[np.float64] = self.ptdf @ vector
        return flows

    def flow_tolerance_w(self, vector: npt.NDArray[np.float64]) -> float:
        """How far a computed flow may be off from float rounding alone.

        PTDF entries carry relative errors around 1e-15; a flow is a sum of
        entries times injections, so its error stays far below 1e-9 of the
        injections' total magnitude. Limits are checked with this margin so
        that a flow exactly at its limit is not reported, while an overload of
        1 W is, on any network whose injections total less than about 100 MW.
        """
        return 1e-9 * float(np.abs(vector).sum()) + 1e-6
