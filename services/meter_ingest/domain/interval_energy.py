"""Energy per delivery interval from cumulative counters, exact in whole Wh.

Each counter (import and export separately) is interpolated at the interval
boundaries: straight lines between accepted readings, evaluated with exact
fractions and rounded half to even to whole Wh at each boundary. An
interval's energy is the difference of its two boundary values, so the
energies of consecutive intervals telescope: they always sum to the counter
difference between the outer boundaries, whatever the reading times, and are
never negative because counters never go down and rounding is monotone.

A counter's readings form segments, one per epoch (a reset or replacement
starts a new one). Energy between two segments that do not touch is unknown;
an interval containing such a hole counts only what its segments saw.

Quality of a boundary, after California's VEE rules: MEASURED when a reading
lies on it or readings on both sides are at most `measured_span_s` apart,
INTERPOLATED when they are at most `interpolation_span_s` (2 h) apart,
ESTIMATED beyond that. An interval takes the worse quality of its two
boundaries, and ESTIMATED if it contains a hole between segments.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from fractions import Fraction

from services.domain.intervals import DEFAULT_INTERVAL_S, Interval
from services.meter_ingest.domain.quantities import ENERGY_COUNTERS
from services.meter_ingest.domain.readings import MeterReading
from services.meter_ingest.domain.vee import (
    CounterReset,
    EpochPoint,
    MeterValidator,
    ValidatedReading,
)


class EnergyQuality(IntEnum):
    """How an interval's energy was obtained; a larger value is worse."""

    MEASURED = 0
    INTERPOLATED = 1
    ESTIMATED = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class CounterPoint:
    """An accepted cumulative counter value at time `t_s`."""

    t_s: float
    value_wh: int


@dataclass(frozen=True, slots=True)
class EnergyRules:
    measured_span_s: float = 120.0
    interpolation_span_s: float = 7200.0


@dataclass(frozen=True, slots=True)
class IntervalEnergy:
    """The energy one counter recorded during one interval."""

    interval: Interval
    energy_wh: int
    quality: EnergyQuality


class Segment:
    """The accepted points of one counter epoch: strictly increasing times, non-decreasing values."""

    def __init__(self, points: Iterable[CounterPoint] = ()) -> None:
        self.times: list[float] = []
        self.values: list[int] = []
        for point in points:
            self.append(point)

    def append(self, point: CounterPoint) -> None:
        if self.times:
            if point.t_s <= self.times[-1]:
                if point.t_s == self.times[-1] and point.value_wh == self.values[-1]:
                    return
                raise ValueError(f"counter point at {point.t_s} is not after {self.times[-1]}")
            if point.value_wh < self.values[-1]:
                raise ValueError(
                    f"counter point {point.value_wh} Wh at {point.t_s} is below {self.values[-1]} Wh"
                )
        self.times.append(point.t_s)
        self.values.append(point.value_wh)

    def __len__(self) -> int:
        return len(self.times)

    @property
    def first_t(self) -> float:
        return self.times[0]

    @property
    def last_t(self) -> float:
        return self.times[-1]

    def at(self, t_s: float, rules: EnergyRules) -> tuple[int, EnergyQuality]:
        """The counter at `t_s` (inside the segment), whole Wh, with the quality of that value."""
        i = bisect.bisect_left(self.times, t_s)
        if i < len(self.times) and self.times[i] == t_s:
            return self.values[i], EnergyQuality.MEASURED
        if i == 0 or i == len(self.times):
            raise ValueError(f"{t_s} is outside the segment [{self.first_t}, {self.last_t}]")
        t0, t1 = self.times[i - 1], self.times[i]
        v0, v1 = self.values[i - 1], self.values[i]
        share = (Fraction(t_s) - Fraction(t0)) / (Fraction(t1) - Fraction(t0))
        value = round(v0 + (v1 - v0) * share)
        span = t1 - t0
        if span <= rules.measured_span_s:
            quality = EnergyQuality.MEASURED
        elif span <= rules.interpolation_span_s:
            quality = EnergyQuality.INTERPOLATED
        else:
            quality = EnergyQuality.ESTIMATED
        return value, quality

    def drop_before(self, t_s: float) -> None:
        """Forget points no longer needed for boundaries at or after `t_s` (keep one at or before it)."""
        i = bisect.bisect_right(self.times, t_s) - 1
        if i > 0:
            del self.times[:i]
            del self.values[:i]


def interval_energy(
    segments: Sequence[Segment],
    intervals: Iterable[Interval],
    rules: EnergyRules | None = None,
) -> list[IntervalEnergy]:
    """Energy of each interval the segments fully cover (both boundaries inside their span)."""
    rules = rules or EnergyRules()
    live = [s for s in segments if len(s)]
    if not live:
        return []
    first_t, last_t = live[0].first_t, live[-1].last_t
    result: list[IntervalEnergy] = []
    for interval in intervals:
        start, end = interval.start_s, interval.end_s
        if start < first_t or end > last_t:
            continue
        energy_wh = 0
        quality = EnergyQuality.MEASURED
        covered_until = float(start)
        for segment in live:
            lo, hi = max(float(start), segment.first_t), min(float(end), segment.last_t)
            if lo > hi:
                continue
            if lo > covered_until:
                # A hole between segments that do not touch: energy there is unknown.
                quality = EnergyQuality.ESTIMATED
            v_lo, q_lo = segment.at(lo, rules)
            v_hi, q_hi = segment.at(hi, rules)
            energy_wh += v_hi - v_lo
            if lo == start:
                quality = max(quality, q_lo)
            if hi == end:
                quality = max(quality, q_hi)
            covered_until = max(covered_until, hi)
        if covered_until < end:
            quality = EnergyQuality.ESTIMATED
        result.append(IntervalEnergy(interval, energy_wh, quality))
    return result


def intervals_between(start_s: float, end_s: float, length_s: int = DEFAULT_INTERVAL_S) -> list[Interval]:
    """Every whole interval inside [start_s, end_s]."""
    first = -(-int(start_s) // length_s) * length_s
    if first < start_s:
        first += length_s
    result = []
    t = first
    while t + length_s <= end_s:
        result.append(Interval(t, length_s))
        t += length_s
    return result


@dataclass(frozen=True, slots=True)
class CounterIntervalEnergy:
    """One meter's energy on one counter (import or export) during one interval."""

    meter_id: str
    counter: str
    interval: Interval
    energy_wh: int
    quality: EnergyQuality


@dataclass(slots=True)
class _Track:
    segments: list[tuple[int, Segment]] = field(default_factory=list)
    next_start_s: int | None = None

    def add(self, point: EpochPoint) -> None:
        if not self.segments or self.segments[-1][0] != point.epoch:
            if self.segments and point.epoch < self.segments[-1][0]:
                raise ValueError(f"{point.counter}: epoch {point.epoch} after {self.segments[-1][0]}")
            self.segments.append((point.epoch, Segment()))
        self.segments[-1][1].append(CounterPoint(point.t_s, point.value_wh))


class IntervalEnergyTracker:
    """Collects one meter's accepted counter points and emits each complete interval exactly once.

    An interval is complete when accepted readings lie at or beyond its end;
    the first interval emitted is the first one that starts at or after the
    first accepted reading. Points no longer needed are dropped.
    """

    def __init__(
        self,
        meter_id: str,
        interval_s: int = DEFAULT_INTERVAL_S,
        rules: EnergyRules | None = None,
        counters: Sequence[str] = ENERGY_COUNTERS,
    ) -> None:
        self.meter_id = meter_id
        self.interval_s = interval_s
        self.rules = rules or EnergyRules()
        self._tracks: dict[str, _Track] = {name: _Track() for name in counters}

    def add_points(self, points: Iterable[EpochPoint]) -> None:
        for point in points:
            track = self._tracks.get(point.counter)
            if track is None:
                continue
            track.add(point)
            if track.next_start_s is None:
                track.next_start_s = -(-int(point.t_s) // self.interval_s) * self.interval_s
                if track.next_start_s < point.t_s:
                    track.next_start_s += self.interval_s

    def pop_complete(self) -> list[CounterIntervalEnergy]:
        """Energies of intervals that became complete since the last call, in time order."""
        out: list[CounterIntervalEnergy] = []
        for name, track in self._tracks.items():
            if track.next_start_s is None or not track.segments:
                continue
            last_t = track.segments[-1][1].last_t
            segments = [segment for _, segment in track.segments]
            pending: list[Interval] = []
            start = track.next_start_s
            while start + self.interval_s <= last_t:
                pending.append(Interval(start, self.interval_s))
                start += self.interval_s
            next_start = track.next_start_s
            for energy in interval_energy(segments, pending, self.rules):
                if energy.interval.start_s != next_start:
                    break  # never skip an interval: stop at the first one that cannot be computed yet
                out.append(
                    CounterIntervalEnergy(
                        self.meter_id, name, energy.interval, energy.energy_wh, energy.quality
                    )
                )
                next_start = energy.interval.end_s
            track.next_start_s = next_start
            self._prune(track)
        out.sort(key=lambda e: (e.interval.start_s, e.counter))
        return out

    def _prune(self, track: _Track) -> None:
        assert track.next_start_s is not None
        boundary = float(track.next_start_s)
        # An older epoch is needed until a newer one covers the boundary (a hole must stay visible).
        while len(track.segments) > 1 and track.segments[1][1].first_t <= boundary:
            track.segments.pop(0)
        track.segments[0][1].drop_before(boundary)


class MeterEnergyPipeline:
    """Validation and interval energy for one meter: readings and reset events in, energies out."""

    def __init__(
        self,
        validator: MeterValidator,
        interval_s: int = DEFAULT_INTERVAL_S,
        rules: EnergyRules | None = None,
    ) -> None:
        self.validator = validator
        self.tracker = IntervalEnergyTracker(validator.meter_id, interval_s, rules)

    def ingest(self, reading: MeterReading) -> ValidatedReading | None:
        """Validate one reading (None when dropped as a duplicate or stale) and keep its counters."""
        validated = self.validator.validate(reading)
        if validated is not None:
            self.tracker.add_points(validated.counter_points())
        return validated

    def reset(self, event: CounterReset) -> None:
        """Apply an explicit meter reset or replacement."""
        self.tracker.add_points(self.validator.apply_reset(event))

    def pop_interval_energy(self) -> list[CounterIntervalEnergy]:
        return self.tracker.pop_complete()
