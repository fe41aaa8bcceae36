"""Line limits for an interval, asked of grid_check over NATS request-reply and applied to the grid."""

from __future__ import annotations

import dataclasses
import logging

from services.domain.grid import Grid
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2
from services.platform.nats_bus import NatsBus
from services.platform.subjects import GRID_LIMITS_REQUEST

log = logging.getLogger(__name__)


def with_limits(grid: Grid, capacities_w: dict[str, int]) -> Grid:
    """The grid with the given line capacities; lines not named keep their rating."""
    if not capacities_w:
        return grid
    lines = tuple(
        dataclasses.replace(line, capacity_w=capacities_w[line.id]) if line.id in capacities_w else line
        for line in grid.lines
    )
    return dataclasses.replace(grid, lines=lines)


class LimitSource:
    """Asks grid_check for an interval's limits; falls back to the grid file's ratings if it cannot answer.

    The fallback is logged and counted: a market without grid_check clears
    against the ratings it was configured with rather than not at all.
    """

    def __init__(self, bus: NatsBus, *, timeout_s: float, attempts: int) -> None:
        self.bus = bus
        self.timeout_s = timeout_s
        self.attempts = attempts

    async def capacities_w(self, interval_start_s: int, grid: Grid) -> dict[str, int] | None:
        if not grid.lines:
            return {}
        request = events_pb2.LimitRequest(interval_start_s=interval_start_s).SerializeToString()
        for attempt in range(1, self.attempts + 1):
            try:
                reply = await self.bus.request(GRID_LIMITS_REQUEST, request, timeout_s=self.timeout_s)
            except Exception as exc:
                log.warning(
                    "no limits from grid_check",
                    extra={"interval_start_s": interval_start_s, "attempt": attempt, "error": repr(exc)},
                )
                continue
            limits = grid_check_pb2.Limits.FromString(reply)
            known = set(grid.line_ids)
            return {line.line_id: int(line.capacity_w) for line in limits.lines if line.line_id in known}
        return None
