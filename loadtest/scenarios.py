"""The four scenarios: how many order actions per second each asks for, and where the meters stand.

A market scenario is a rate of order actions (a placed order or an amend)
as a function of the time since the load began and of the market clock;
the traders carry them out (see `traders.py`). The meter flood has no order
rate: its push meters send readings as fast as the service accepts them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

STEADY = "steady"
MORNING_RAMP = "morning-ramp"
GATE_BURST = "gate-burst"
METER_FLOOD = "meter-flood"
SCENARIOS: tuple[str, ...] = (STEADY, MORNING_RAMP, GATE_BURST, METER_FLOOD)

DESCRIPTIONS: dict[str, str] = {
    STEADY: "traders place and amend orders for the next intervals at a constant rate",
    MORNING_RAMP: "the order rate rises linearly from 0 to twice --rate over the run (average --rate)",
    GATE_BURST: "most orders land in the last seconds before each gate closure, for the interval closing",
    METER_FLOOD: "push meters send readings as fast as meter_ingest accepts them; no trading",
}

# Gate-closure burst: the share of an interval's orders sent in the window before its gate, and the window.
BURST_SHARE = 0.8
BURST_WINDOW_MAX_WALL_S = 2.0
BURST_WINDOW_SHARE_OF_INTERVAL = 0.25


@dataclass(frozen=True)
class MarketCalendar:
    """The market's intervals and gates on its clock, and that clock's speed against the wall clock."""

    interval_s: int
    gate_closure_s: int
    speedup: float

    def next_gate_s(self, now_s: float) -> int:
        """The next gate closure after `now_s` (market clock)."""
        start_s = (int((now_s + self.gate_closure_s) // self.interval_s) + 1) * self.interval_s
        return start_s - self.gate_closure_s

    def interval_wall_s(self) -> float:
        return self.interval_s / self.speedup

    def burst_window_wall_s(self) -> float:
        return min(BURST_WINDOW_MAX_WALL_S, BURST_WINDOW_SHARE_OF_INTERVAL * self.interval_wall_s())

    def in_burst_window(self, now_s: float) -> bool:
        """Whether `now_s` lies in the last seconds before a gate closure."""
        return (self.next_gate_s(now_s) - now_s) / self.speedup <= self.burst_window_wall_s()


def order_rate_per_s(
    scenario: str,
    rate_per_s: float,
    elapsed_s: float,
    duration_s: float,
    now_s: float,
    calendar: MarketCalendar,
) -> float:
    """Order actions per wall second the scenario asks for at `elapsed_s` into the load (market time `now_s`)."""
    if scenario == STEADY:
        return rate_per_s
    if scenario == MORNING_RAMP:
        return 2.0 * rate_per_s * min(1.0, max(0.0, elapsed_s / duration_s))
    if scenario == GATE_BURST:
        window_s = calendar.burst_window_wall_s()
        interval_wall_s = calendar.interval_wall_s()
        if calendar.in_burst_window(now_s):
            return BURST_SHARE * rate_per_s * interval_wall_s / window_s
        return (1.0 - BURST_SHARE) * rate_per_s * interval_wall_s / max(interval_wall_s - window_s, 1e-9)
    return 0.0


class Deadline:
    """The end of the load as a `time.monotonic()` instant; Ctrl-C moves it to now (and keeps it there)."""

    def __init__(self, end_s: float = float("inf")) -> None:
        self.end_s = end_s
        self.interrupted = False

    def stop(self) -> None:
        self.interrupted = True
        self.end_s = min(self.end_s, time.monotonic())

    def set(self, end_s: float) -> None:
        self.end_s = min(self.end_s, end_s)

    def passed(self) -> bool:
        return time.monotonic() >= self.end_s
