"""The live view: node injections and line loading from the latest metered power at each node.

Meters report active power positive when their site imports from the grid;
a node's injection into the grid is the negative sum of its meters' power.
The slack node (the connection to the upstream grid) supplies or absorbs
whatever the metered nodes do not balance, so its injection is computed, not
metered. Readings older than `stale_after_s` no longer count: a meter that
went silent contributes nothing rather than a frozen value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.grid_check.domain.checks import LineLoading, Violation, assess_flows
from services.grid_check.domain.limits import LineLimit
from services.grid_check.domain.network import FlowModel

DEFAULT_STALE_AFTER_S = 60.0


@dataclass(frozen=True, slots=True)
class LiveState:
    """The grid as the meters see it at `as_of_s`."""

    as_of_s: float
    injections_w: dict[str, float]
    lines: tuple[LineLoading, ...]
    violations: tuple[Violation, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "as_of_s": self.as_of_s,
            "injections": [
                {"node_id": node_id, "injection_w": round(value_w)}
                for node_id, value_w in self.injections_w.items()
            ],
            "lines": [line.as_dict() for line in self.lines],
            "violations": [v.as_dict() for v in self.violations],
        }


def live_state(
    model: FlowModel,
    limits: Mapping[str, LineLimit],
    metered_power_w: Mapping[str, float],
    *,
    as_of_s: float,
) -> LiveState:
    """Injections and line loading from metered power per node (positive = importing from the grid).

    Nodes without a meter inject nothing; the slack balances the rest.
    Raises `InvalidArgument` for a node the grid does not know.
    """
    injections = {node_id: -power_w for node_id, power_w in metered_power_w.items()}
    vector = model.injection_vector(injections, slack_balances=True)
    flows = model.flows_w(vector)
    lines, violations = assess_flows(model, flows, limits, model.flow_tolerance_w(vector))
    return LiveState(
        as_of_s=as_of_s,
        injections_w=dict(zip(model.node_ids, vector.tolist(), strict=True)),
        lines=lines,
        violations=violations,
    )


@dataclass(slots=True)
class _LastReading:
    node_id: str
    time_s: float
    power_w: float


class LiveMeters:
    """The latest power reading of every meter, and the fresh total per node."""

    def __init__(self, *, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> None:
        if stale_after_s <= 0:
            raise ValueError(f"stale_after_s must be positive, got {stale_after_s}")
        self.stale_after_s = stale_after_s
        self._last: dict[str, _LastReading] = {}

    def update(self, *, meter_id: str, node_id: str, time_s: float, power_w: float) -> bool:
        """Record a reading; an older or equally old one than the meter's latest is ignored (returns False)."""
        last = self._last.get(meter_id)
        if last is not None and time_s <= last.time_s:
            return False
        self._last[meter_id] = _LastReading(node_id, time_s, power_w)
        return True

    def power_by_node(self, now_s: float) -> dict[str, float]:
        """Sum of fresh readings per node (positive = importing from the grid)."""
        totals: dict[str, float] = {}
        for reading in self._last.values():
            if now_s - reading.time_s <= self.stale_after_s:
                totals[reading.node_id] = totals.get(reading.node_id, 0.0) + reading.power_w
        return totals

    def fresh_meter_count(self, now_s: float) -> int:
        """How many meters have a reading fresh enough to count at `now_s`."""
        return sum(1 for r in self._last.values() if now_s - r.time_s <= self.stale_after_s)

    def latest_time_s(self) -> float | None:
        return max((r.time_s for r in self._last.values()), default=None)
