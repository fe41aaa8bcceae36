"""Every configured meter's pipeline, fed by the poller and by push streams; readings out as Reading messages.

This is where a reading meets its meter: polled readings arrive as domain
`MeterReading`s, pushed ones as protobuf `Reading`s, and both go through the
meter's `MeterEnergyPipeline` (validation, then counters for interval energy).
What comes out is the Reading message to publish (see `convert.py` for its
flags), or nothing for a duplicate. Pushed readings are checked against the
caller's permissions first: a reading for a meter the caller may not push is
rejected, counted and never published.

Pushed readings (`Reading` fields):
- `quality` must be set. QUALITY_VALID: all three values are usable, except
  those the source names in `flags` as `<quantity>:<reason>`; QUALITY_ESTIMATED:
  the values are the source's estimates, published as such, and its counters
  never count for interval energy; QUALITY_INVALID: no value is usable.
- `time_ms` is the meter's (or gateway's) clock; it must be later than the
  meter's previous reading, else the reading is a duplicate and dropped.
- `counter_reset` starts a new counter epoch at this reading (an explicit reset
  or meter replacement); it must not be earlier than the previous reading.

The push path runs once per reading at high rates, so it avoids building
domain objects and forwards a reading's message untouched when validation
found nothing to add.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.domain.intervals import Clock
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
from services.meter_ingest.adapters.convert import CARRIED, MS_PER_S, polled_reading, value_flag
from services.meter_ingest.domain.interval_energy import (
    ORDINARY,
    EnergyRules,
    MeterEnergyPipeline,
    MeterIntervalEnergy,
)
from services.meter_ingest.domain.meter_config import MeterConfig, push_permissions
from services.meter_ingest.domain.quantities import Quality
from services.meter_ingest.domain.readings import MeterReading, MeterStatus
from services.meter_ingest.domain.vee import (
    CounterReset,
    MeterValidator,
    ReadingFlag,
    VeeSettings,
    limits_from_map,
)
from services.meter_ingest.meters import ConfiguredMeter
from services.platform.metrics import Metrics

# Error texts a push summary returns at most (the counts are always complete).
MAX_ERRORS = 20
# Reasons a pushed reading's source may give for an invalid value, kept as metric labels; others count as
# "reported_invalid" so that callers cannot create label values.
_KNOWN_REASONS = frozenset(q.value for q in Quality)
_QUALITIES = (pb.QUALITY_VALID, pb.QUALITY_INVALID, pb.QUALITY_ESTIMATED)
_UNKNOWN_METER = "unknown"


@dataclass(slots=True)
class MeterEntry:
    config: MeterConfig
    pipeline: MeterEnergyPipeline
    polled: bool
    # Polled meters: service-clock time of the newest reading with a usable value (for the age metric).
    last_read_at_s: float | None = None


@dataclass(slots=True)
class PushOutcome:
    """What one pushed message came to: the readings to publish, how many were refused and why."""

    readings: list[pb.Reading] = field(default_factory=list)
    rejected: int = 0
    errors: list[str] = field(default_factory=list)

    def reject(self, message: str) -> None:
        self.rejected += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(message)


class Ingestor:
    """The meters of one service process, their pipelines and their reading metrics."""

    def __init__(
        self,
        meters: Sequence[ConfiguredMeter],
        *,
        interval_s: int,
        vee: VeeSettings,
        clock: Clock,
        metrics: Metrics,
        energy_rules: EnergyRules | None = None,
    ) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self.entries: dict[str, MeterEntry] = {
            m.meter_id: MeterEntry(
                config=m.config,
                pipeline=MeterEnergyPipeline(
                    MeterValidator(m.meter_id, limits_from_map(m.register_map), vee), interval_s, energy_rules
                ),
                polled=m.unit is not None,
            )
            for m in meters
        }
        self._pipelines = {meter_id: entry.pipeline for meter_id, entry in self.entries.items()}
        self.permissions: dict[str, frozenset[str]] = push_permissions([m.config for m in meters])
        # Meters whose state changed since it was last saved.
        self.dirty: set[str] = set()
        self.started_at_s = clock.now_s()
        self._readings = metrics.counter("p2pgrid_meter_readings_total")
        self._invalid = metrics.counter("p2pgrid_meter_invalid_total")
        self._polls = metrics.counter("p2pgrid_meter_polls_total")
        self._offline = metrics.gauge("p2pgrid_meter_offline")
        self._age = metrics.gauge("p2pgrid_meter_last_reading_age_seconds")

    # ------------------------------------------------------------------ state

    def restore(self, states: Mapping[str, Mapping[str, Any]]) -> int:
        """Continue each configured meter from its saved state; returns how many were restored."""
        restored = 0
        for meter_id, state in states.items():
            entry = self.entries.get(meter_id)
            if entry is None:
                continue  # no longer configured
            entry.pipeline.restore(state)
            entry.last_read_at_s = entry.pipeline.validator.last_read_at_s
            restored += 1
        return restored

    def snapshots(self, meter_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        return {meter_id: self.entries[meter_id].pipeline.snapshot() for meter_id in meter_ids}

    def take_dirty(self) -> set[str]:
        dirty, self.dirty = self.dirty, set()
        return dirty

    def release(self, cutoff_s: float) -> list[tuple[MeterIntervalEnergy, MeterConfig]]:
        """Every meter's intervals ended by `cutoff_s` and complete, each exactly once."""
        out = []
        for entry in self.entries.values():
            for energy in entry.pipeline.release(cutoff_s):
                out.append((energy, entry.config))
        return out

    # ------------------------------------------------------------------ polled readings

    def accept_polled(self, reading: MeterReading) -> pb.Reading | None:
        """Validate one polled reading; the message to publish, or None for a duplicate."""
        entry = self.entries[reading.meter_id]
        # Published times are whole milliseconds; validate the time that is published.
        read_at_s = round(reading.read_at_s * MS_PER_S) / MS_PER_S
        if read_at_s != reading.read_at_s:
            reading = dataclasses.replace(reading, read_at_s=read_at_s)
        self._polls.labels(outcome=_poll_outcome(reading)).inc()
        self._offline.labels(meter=reading.meter_id).set(1 if reading.status is MeterStatus.OFFLINE else 0)
        validated = entry.pipeline.ingest(reading)
        if validated is None:
            self._readings.labels(source="poll", quality="duplicate").inc()
            return None
        self.dirty.add(reading.meter_id)
        message = polled_reading(validated)
        if any(value.ok for value in validated.values.values()):
            entry.last_read_at_s = read_at_s
        for value in validated.values.values():
            if not value.ok:
                self._invalid.labels(meter=reading.meter_id, reason=value.quality.value).inc()
        self._readings.labels(source="poll", quality=_QUALITY_LABELS[message.quality]).inc()
        return message

    # ------------------------------------------------------------------ pushed readings

    def accept_pushed(self, participant_id: str, readings: Sequence[pb.Reading]) -> PushOutcome:
        """Check permissions and validate one pushed message's readings, in order."""
        outcome = PushOutcome()
        allowed = self.permissions.get(participant_id, frozenset())
        pipelines = self._pipelines
        received_at_s = self.clock.now_s()
        publish = outcome.readings.append
        mark_dirty = self.dirty.add
        qualities: Counter[int] = Counter()
        invalid: Counter[tuple[str, str]] = Counter()
        ordinary = duplicates = 0
        valid = pb.QUALITY_VALID
        for index, reading in enumerate(readings):
            meter_id = reading.meter_id
            if meter_id not in allowed:
                # The same answer whether the meter exists or not: callers learn nothing about others' meters.
                outcome.reject(
                    f"readings[{index}]: meter {meter_id!r} may not be pushed with this caller's key"
                )
                invalid[(meter_id if meter_id in pipelines else _UNKNOWN_METER, "not_permitted")] += 1
                continue
            time_ms = reading.time_ms
            quality = reading.quality
            pipeline = pipelines[meter_id]
            if quality == valid and time_ms > 0 and not reading.counter_reset and not reading.flags:
                # The usual reading: valid, all three values, nothing to add.
                check = pipeline.ingest_carried(
                    time_ms / MS_PER_S,
                    received_at_s,
                    reading.energy_import_wh,
                    reading.energy_export_wh,
                    reading.power_w,
                )
                if check is ORDINARY:
                    mark_dirty(meter_id)
                    publish(reading)
                    ordinary += 1
                    continue
                marked_any = False
            else:
                if time_ms <= 0 or quality not in _QUALITIES:
                    field_name = "time_ms" if time_ms <= 0 else "quality"
                    rule = (
                        "must be positive Unix milliseconds"
                        if time_ms <= 0
                        else "must be QUALITY_VALID, QUALITY_INVALID or QUALITY_ESTIMATED"
                    )
                    outcome.reject(f"readings[{index}].{field_name}: {rule}")
                    invalid[(meter_id, "malformed")] += 1
                    continue
                t_s = time_ms / MS_PER_S
                if reading.counter_reset:
                    try:
                        pipeline.reset(CounterReset(meter_id, t_s))
                    except ValueError as exc:
                        outcome.reject(f"readings[{index}].counter_reset: {exc}")
                        invalid[(meter_id, "malformed")] += 1
                        continue
                if quality == pb.QUALITY_INVALID:
                    marked = dict.fromkeys(CARRIED, "")
                    marked_any = False
                else:
                    marked = _marked_invalid(reading.flags)
                    marked_any = bool(marked)
                for reason in marked.values():
                    invalid[(meter_id, reason if reason in _KNOWN_REASONS else "reported_invalid")] += 1
                values = {name: getattr(reading, name) for name in CARRIED if name not in marked}
                check = pipeline.ingest_values(t_s, received_at_s, values, counters=quality == valid)
            if check is None:
                duplicates += 1
                outcome.reject(
                    f"readings[{index}]: meter {meter_id!r} at {time_ms} ms is not later than its last reading "
                    "(dropped as a duplicate)"
                )
                continue
            mark_dirty(meter_id)
            if not check.flags and not check.problems and not marked_any:
                publish(reading)
                qualities[quality] += 1
                continue
            message = pb.Reading()
            message.CopyFrom(reading)
            message.flags.extend(flag.value for flag in check.flags)
            for name, problem, _detail in check.problems:
                message.flags.append(value_flag(name, problem.value))
                invalid[(meter_id, problem.value)] += 1
            if marked_any or check.problems or ReadingFlag.CLOCK_SKEW in check.flags:
                message.quality = pb.QUALITY_INVALID
            publish(message)
            qualities[message.quality] += 1
        qualities[valid] += ordinary
        for code, count in qualities.items():
            if count:
                self._readings.labels(source="push", quality=_QUALITY_LABELS[code]).inc(count)
        not_published = outcome.rejected - duplicates
        if not_published:
            self._readings.labels(source="push", quality="rejected").inc(not_published)
        if duplicates:
            self._readings.labels(source="push", quality="duplicate").inc(duplicates)
        for (meter_id, reason), count in invalid.items():
            self._invalid.labels(meter=meter_id, reason=reason).inc(count)
        return outcome

    # ------------------------------------------------------------------ metrics

    def observe(self, now_s: float, offline: Mapping[str, bool]) -> None:
        """Set every meter's reading age (since start for a meter not read yet) and polled meters' offline gauge."""
        for meter_id, entry in self.entries.items():
            # A pushed reading's time is the meter's; a polled meter's newest reading counts when it had a value.
            last = entry.last_read_at_s if entry.polled else entry.pipeline.validator.last_read_at_s
            if last is None:
                last = self.started_at_s
            self._age.labels(meter=meter_id).set(max(0.0, now_s - last))
        for meter_id, is_offline in offline.items():
            self._offline.labels(meter=meter_id).set(1 if is_offline else 0)


_QUALITY_LABELS: dict[int, str] = {
    pb.QUALITY_VALID: "valid",
    pb.QUALITY_INVALID: "invalid",
    pb.QUALITY_ESTIMATED: "estimated",
}


def _marked_invalid(flags: Iterable[str]) -> dict[str, str]:
    """Values a source names as unusable in its flags (`<quantity>:<reason>`), with the reason."""
    marked: dict[str, str] = {}
    for flag in flags:
        name, sep, reason = flag.partition(":")
        if sep and name in CARRIED:
            marked[name] = reason
    return marked


def _poll_outcome(reading: MeterReading) -> str:
    """ok when the meter answered with at least one usable value; else the reason of the first value."""
    qualities = [value.quality for value in reading.values.values()]
    if any(q is Quality.OK for q in qualities):
        return "ok"
    for reason in (Quality.TIMEOUT, Quality.UNREACHABLE, Quality.EXCEPTION):
        if reason in qualities:
            return reason.value
    return "error"
