"""Delivery intervals, gate closure times and the clocks every service takes its time from.

An interval is identified by its start as whole seconds since the Unix epoch
(UTC) and is `interval_s` long (900 s by default). Gate closure for an
interval is `gate_closure_s` before its start. Time is an input: services
take a `Clock`, either the real one or a simulated one that starts at a given
instant and runs `speedup` times faster than the wall clock.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Protocol

DEFAULT_INTERVAL_S = 900
DEFAULT_GATE_CLOSURE_S = 300


@dataclass(frozen=True, slots=True, order=True)
class Interval:
    """One delivery interval: `[start_s, start_s + length_s)` in Unix seconds."""

    start_s: int
    length_s: int = DEFAULT_INTERVAL_S

    def __post_init__(self) -> None:
        if self.length_s <= 0:
            raise ValueError(f"interval length_s must be positive, got {self.length_s}")
        if self.start_s % self.length_s != 0:
            raise ValueError(
                f"interval start_s {self.start_s} is not aligned to its length of {self.length_s} s"
            )

    @property
    def end_s(self) -> int:
        return self.start_s + self.length_s

    def gate_closure_s(self, lead_s: int = DEFAULT_GATE_CLOSURE_S) -> int:
        return self.start_s - lead_s

    def next(self) -> Interval:
        return Interval(self.end_s, self.length_s)

    def iso(self) -> str:
        return datetime.fromtimestamp(self.start_s, UTC).strftime("%Y-%m-%dT%H:%MZ")

    @classmethod
    def containing(cls, t_s: float, length_s: int = DEFAULT_INTERVAL_S) -> Interval:
        return cls(int(t_s // length_s) * length_s, length_s)


class Clock(Protocol):
    """Where a service gets the time from."""

    def now_s(self) -> float:
        """Seconds since the Unix epoch, as this clock sees them."""
        ...

    async def sleep_until(self, t_s: float) -> None:
        """Return once `now_s()` has reached `t_s`."""
        ...


class RealClock:
    """The wall clock."""

    def now_s(self) -> float:
        return time.time()

    async def sleep_until(self, t_s: float) -> None:
        delay_s = t_s - self.now_s()
        if delay_s > 0:
            await asyncio.sleep(delay_s)


@dataclass(frozen=True, slots=True)
class SimulatedClock:
    """A clock that reads `start_s` at wall time `anchor_wall_s` and runs `speedup` times faster.

    Processes that share `start_s`, `speedup` and `anchor_wall_s` agree on the
    simulated time, so a whole stack can run a day of intervals in minutes.
    """

    start_s: float
    speedup: float = 1.0
    anchor_wall_s: float = 0.0

    def __post_init__(self) -> None:
        if self.speedup <= 0:
            raise ValueError(f"speedup must be positive, got {self.speedup}")
        if self.anchor_wall_s == 0.0:
            # No shared anchor given: the clock reads start_s now, when it is made.
            object.__setattr__(self, "anchor_wall_s", time.time())

    def now_s(self) -> float:
        return self.start_s + (time.time() - self.anchor_wall_s) * self.speedup

    async def sleep_until(self, t_s: float) -> None:
        while True:
            remaining_sim_s = t_s - self.now_s()
            if remaining_sim_s <= 0:
                return
            await asyncio.sleep(min(remaining_sim_s / self.speedup, 1.0))
