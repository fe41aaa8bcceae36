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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from fractions import Fraction
from typing import Any

from services.domain.intervals import DEFAULT_INTERVAL_S, Interval
from services.meter_ingest.domain.quantities import ENERGY_COUNTERS, Number
from services.meter_ingest.domain.readings import MeterReading
from services.meter_ingest.domain.vee import (
    CounterReset,
    EpochPoint,
    MeterValidator,
    ValidatedReading,
    ValueCheck,
)

IMPORT_COUNTER, EXPORT_COUNTER = ENERGY_COUNTERS
POWER = "power_w"


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

    def __init__(
        self, points: Iterable[CounterPoint] = (), *, thin_to_boundaries_s: int | None = None
    ) -> None:
        self.times: list[float] = []
        self.values: list[int] = []
        # With an interval length, points that no boundary can need are not kept (see `append`).
        self.thin_to_boundaries_s = thin_to_boundaries_s
        for point in points:
            self.append(point)

    def append(self, point: CounterPoint) -> None:
        self.append_value(point.t_s, point.value_wh)

    def append_value(self, t_s: float, value_wh: int) -> None:
        times, values = self.times, self.values
        if times:
            if t_s <= times[-1]:
                if t_s == times[-1] and value_wh == values[-1]:
                    return
                raise ValueError(f"counter point at {t_s} is not after {times[-1]}")
            if value_wh < values[-1]:
                raise ValueError(f"counter point {value_wh} Wh at {t_s} is below {values[-1]} Wh")
            # Boundaries are multiples of `length`. When none lies strictly between the
            # second-last point and the new one, the last point can never be a boundary's
            # neighbour (nor the segment's first or last), so the new point replaces it.
            # A counter read every few seconds then keeps about three points per interval.
            length = self.thin_to_boundaries_s
            if length is not None and len(times) >= 2 and (times[-2] // length + 1) * length >= t_s:
                times[-1] = t_s
                values[-1] = value_wh
                return
        times.append(t_s)
        values.append(value_wh)

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
    interval_s: int
    segments: list[tuple[int, Segment]] = field(default_factory=list)
    next_start_s: int | None = None
    # The first interval this counter reports; earlier ones it never covers.
    first_start_s: int | None = None

    def add(self, point: EpochPoint) -> None:
        if not self.segments or self.segments[-1][0] != point.epoch:
            if self.segments and point.epoch < self.segments[-1][0]:
                raise ValueError(f"{point.counter}: epoch {point.epoch} after {self.segments[-1][0]}")
            self.segments.append((point.epoch, Segment(thin_to_boundaries_s=self.interval_s)))
        self.segments[-1][1].append_value(point.t_s, point.value_wh)

    def snapshot(self) -> dict[str, Any]:
        return {
            "first_start_s": self.first_start_s,
            "next_start_s": self.next_start_s,
            "segments": [[epoch, list(seg.times), list(seg.values)] for epoch, seg in self.segments],
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        self.first_start_s = None if data["first_start_s"] is None else int(data["first_start_s"])
        self.next_start_s = None if data["next_start_s"] is None else int(data["next_start_s"])
        segments = []
        for epoch, times, values in data["segments"]:
            segment = Segment(thin_to_boundaries_s=self.interval_s)
            # Stored points were accepted in order already; take them back as they are.
            segment.times = [float(t) for t in times]
            segment.values = [int(v) for v in values]
            if len(segment.times) != len(segment.values):
                raise ValueError("a stored segment has different numbers of times and values")
            segments.append((int(epoch), segment))
        self.segments = segments


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
        self._tracks: dict[str, _Track] = {name: _Track(interval_s) for name in counters}

    @property
    def counters(self) -> tuple[str, ...]:
        return tuple(self._tracks)

    def covers(self, counter: str, start_s: int) -> bool:
        """Whether `counter` has reported or will report the interval starting at `start_s`."""
        track = self._tracks.get(counter)
        return track is not None and track.first_start_s is not None and track.first_start_s <= start_s

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
                track.first_start_s = track.next_start_s

    def add_value(self, counter: str, epoch: int, t_s: float, value_wh: int) -> None:
        """`add_points` for one point, short when the point continues the counter's current segment."""
        track = self._tracks.get(counter)
        if track is None:
            return
        segments = track.segments
        if segments and segments[-1][0] == epoch and track.next_start_s is not None:
            segments[-1][1].append_value(t_s, value_wh)
        else:
            self.add_points((EpochPoint(counter, epoch, t_s, value_wh),))

    def add_carried(
        self, t_s: float, import_epoch: int, import_wh: int, export_epoch: int, export_wh: int
    ) -> None:
        """`add_value` for both counters of one reading, the common case written out (the push path's cost).

        When a counter's point continues its current segment and lies in the
        same interval as the two before it, it replaces the last one (see
        `Segment.append_value`); everything else goes through `add_value`.
        """
        length = self.interval_s
        # Import, then the same for export.
        track = self._tracks.get(IMPORT_COUNTER)
        if track is not None and track.segments and track.next_start_s is not None:
            epoch_now, segment = track.segments[-1]
            times, values = segment.times, segment.values
            if (
                epoch_now == import_epoch
                and len(times) >= 2
                and times[-1] < t_s
                and values[-1] <= import_wh
                and (times[-2] // length + 1) * length >= t_s
            ):
                times[-1] = t_s
                values[-1] = import_wh
                track = None
        if track is not None:
            self.add_value(IMPORT_COUNTER, import_epoch, t_s, import_wh)
        track = self._tracks.get(EXPORT_COUNTER)
        if track is not None and track.segments and track.next_start_s is not None:
            epoch_now, segment = track.segments[-1]
            times, values = segment.times, segment.values
            if (
                epoch_now == export_epoch
                and len(times) >= 2
                and times[-1] < t_s
                and values[-1] <= export_wh
                and (times[-2] // length + 1) * length >= t_s
            ):
                times[-1] = t_s
                values[-1] = export_wh
                track = None
        if track is not None:
            self.add_value(EXPORT_COUNTER, export_epoch, t_s, export_wh)

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

    def snapshot(self) -> dict[str, Any]:
        """The tracker's state as JSON-ready data; `restore` takes it back."""
        return {name: track.snapshot() for name, track in self._tracks.items()}

    def restore(self, data: Mapping[str, Any]) -> None:
        try:
            for name, track_data in data.items():
                track = self._tracks.get(name)
                if track is not None:
                    track.restore(track_data)
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"meter {self.meter_id}: unreadable interval energy state: {exc!r}") from None


@dataclass(frozen=True, slots=True)
class MeterIntervalEnergy:
    """One meter's import and export energy during one interval, ready to publish.

    A counter that does not cover the interval (it had no accepted value before
    the interval started, e.g. a register the meter does not implement) counts
    0 and makes the interval ESTIMATED; it is named in `missing`.
    """

    meter_id: str
    interval: Interval
    import_wh: int
    export_wh: int
    quality: EnergyQuality
    missing: tuple[str, ...] = ()


# What `ingest_carried` returns for an ordinary reading: nothing to flag (its points went to the tracker).
ORDINARY = ValueCheck((), (), ())


class MeterEnergyPipeline:
    """Validation and interval energy for one meter: readings and reset events in, energies out.

    `release(cutoff_s)` is the service's way out: it collects each counter's
    complete intervals and hands out, in time order and each exactly once, the
    intervals that ended at or before `cutoff_s` and that every counter covering
    them has reported. Until then they wait in `pending`, which is part of the
    snapshot, so nothing popped is lost across a restart.
    """

    def __init__(
        self,
        validator: MeterValidator,
        interval_s: int = DEFAULT_INTERVAL_S,
        rules: EnergyRules | None = None,
    ) -> None:
        self.validator = validator
        self.interval_s = interval_s
        self.tracker = IntervalEnergyTracker(validator.meter_id, interval_s, rules)
        self.pending: dict[int, dict[str, CounterIntervalEnergy]] = {}
        # Bound once: `ingest_carried` runs per pushed reading.
        self._accept_ordinary = validator.accept_ordinary
        self._add_carried = self.tracker.add_carried

    @property
    def meter_id(self) -> str:
        return self.validator.meter_id

    def ingest(self, reading: MeterReading) -> ValidatedReading | None:
        """Validate one reading (None when dropped as a duplicate or stale) and keep its counters."""
        validated = self.validator.validate(reading)
        if validated is not None:
            self.tracker.add_points(validated.counter_points())
        return validated

    def ingest_values(
        self, t_s: float, received_at_s: float | None, values: Mapping[str, Number], *, counters: bool = True
    ) -> ValueCheck | None:
        """`ingest` for plain values (pushed readings): see `MeterValidator.check_values`."""
        check = self.validator.check_values(t_s, received_at_s, values, counters=counters)
        if check is not None and check.points:
            self.tracker.add_points(check.points)
        return check

    def ingest_carried(
        self, t_s: float, received_at_s: float | None, import_wh: Number, export_wh: Number, power_w: Number
    ) -> ValueCheck | None:
        """`ingest_values` of a reading with both counters and total power, all valid, faster.

        The ordinary reading (nothing to flag) takes `MeterValidator.accept_ordinary`
        and comes back as `ORDINARY` (its accepted points went to the tracker and
        are not repeated); any other goes the general way. Flags, problems and the
        state afterwards are those of `ingest_values`.
        """
        accepted = self._accept_ordinary(t_s, received_at_s, import_wh, export_wh, power_w)
        if accepted is None:
            return self.ingest_values(
                t_s, received_at_s, {IMPORT_COUNTER: import_wh, EXPORT_COUNTER: export_wh, POWER: power_w}
            )
        self._add_carried(t_s, *accepted)
        return ORDINARY

    def reset(self, event: CounterReset) -> None:
        """Apply an explicit meter reset or replacement."""
        self.tracker.add_points(self.validator.apply_reset(event))

    def pop_interval_energy(self) -> list[CounterIntervalEnergy]:
        return self.tracker.pop_complete()

    def release(self, cutoff_s: float) -> list[MeterIntervalEnergy]:
        """Intervals ended by `cutoff_s` with every covering counter reported, each exactly once."""
        for energy in self.tracker.pop_complete():
            self.pending.setdefault(energy.interval.start_s, {})[energy.counter] = energy
        released: list[MeterIntervalEnergy] = []
        for start_s in sorted(self.pending):
            entries = self.pending[start_s]
            interval = next(iter(entries.values())).interval
            if interval.end_s > cutoff_s:
                break
            covering = [c for c in self.tracker.counters if self.tracker.covers(c, start_s)]
            if any(c not in entries for c in covering):
                break  # a counter lags (no usable reading after the interval yet): wait for it
            missing = tuple(c for c in self.tracker.counters if c not in entries)
            quality = max((e.quality for e in entries.values()), default=EnergyQuality.ESTIMATED)
            if missing:
                quality = EnergyQuality.ESTIMATED
            imported = entries.get(IMPORT_COUNTER)
            exported = entries.get(EXPORT_COUNTER)
            released.append(
                MeterIntervalEnergy(
                    meter_id=self.meter_id,
                    interval=interval,
                    import_wh=imported.energy_wh if imported is not None else 0,
                    export_wh=exported.energy_wh if exported is not None else 0,
                    quality=quality,
                    missing=missing,
                )
            )
            del self.pending[start_s]
        return released

    def snapshot(self) -> dict[str, Any]:
        """Everything the pipeline needs to continue after a restart, as JSON-ready data."""
        return {
            "validator": self.validator.snapshot(),
            "tracker": self.tracker.snapshot(),
            "pending": [
                [e.counter, e.interval.start_s, e.interval.length_s, e.energy_wh, int(e.quality)]
                for start_s in sorted(self.pending)
                for e in self.pending[start_s].values()
            ],
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Continue from a `snapshot` (taken with the same interval length)."""
        try:
            self.validator.restore(data["validator"])
            self.tracker.restore(data["tracker"])
            pending: dict[int, dict[str, CounterIntervalEnergy]] = {}
            for counter, start_s, length_s, energy_wh, quality in data["pending"]:
                if int(length_s) != self.interval_s:
                    raise ValueError(f"stored interval length {length_s} s is not {self.interval_s} s")
                interval = Interval(int(start_s), int(length_s))
                pending.setdefault(interval.start_s, {})[str(counter)] = CounterIntervalEnergy(
                    self.meter_id, str(counter), interval, int(energy_wh), EnergyQuality(int(quality))
                )
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"meter {self.meter_id}: unreadable pipeline state: {exc}") from None
        self.pending = pending
