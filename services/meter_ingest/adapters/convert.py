"""Translation between meter_ingest's domain types and its protobuf messages (Reading, ReadingsBatch, IntervalEnergy).

Published readings follow one convention, for polled and pushed readings
alike:
- `quality` is QUALITY_INVALID when any value the reading carries is unusable
  (or its time is: clock skew), QUALITY_ESTIMATED when the source said the
  values are estimates, QUALITY_VALID otherwise;
- `flags` names each unusable value as `<quantity>:<reason>` (for example
  `power_w:nan`, `energy_import_wh:counter_backwards`), whatever number its
  field holds (0 when the meter gave none: invalid is never 0, it is flagged),
  and carries the reading's own flags: `gap`, `clock_skew`, `offline`,
  `epoch_start` (the first usable counter after a start or reset).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from services.domain.intervals import Interval
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
from services.meter_ingest.domain.interval_energy import EnergyQuality, MeterIntervalEnergy
from services.meter_ingest.domain.meter_config import MeterConfig
from services.meter_ingest.domain.quantities import Quality
from services.meter_ingest.domain.vee import ReadingFlag, ValidatedReading
from services.platform.subjects import INTERVAL_ENERGY, METER_READINGS, keyed

# The quantities a Reading message carries, by field name.
CARRIED: tuple[str, ...] = ("energy_import_wh", "energy_export_wh", "power_w")
MS_PER_S = 1000

ENERGY_FLAGS: dict[EnergyQuality, events_pb2.EnergyFlag.ValueType] = {
    EnergyQuality.MEASURED: events_pb2.ENERGY_FLAG_MEASURED,
    EnergyQuality.INTERPOLATED: events_pb2.ENERGY_FLAG_INTERPOLATED,
    EnergyQuality.ESTIMATED: events_pb2.ENERGY_FLAG_ESTIMATED,
}


def value_flag(name: str, reason: str) -> str:
    return f"{name}:{reason}"


def polled_reading(validated: ValidatedReading) -> pb.Reading:
    """The Reading message of a validated polled reading (time to the millisecond)."""
    flags = sorted(flag.value for flag in validated.flags)
    numbers: dict[str, int] = {}
    invalid = ReadingFlag.CLOCK_SKEW in validated.flags
    for name in CARRIED:
        value = validated.values.get(name)
        if value is None:
            flags.append(value_flag(name, Quality.NO_DATA.value))
            invalid = True
        elif value.ok and value.value is not None:
            numbers[name] = round(value.value)
        else:
            flags.append(value_flag(name, value.quality.value))
            invalid = True
    return pb.Reading(
        meter_id=validated.meter_id,
        time_ms=round(validated.read_at_s * MS_PER_S),
        energy_import_wh=numbers.get("energy_import_wh", 0),
        energy_export_wh=numbers.get("energy_export_wh", 0),
        power_w=numbers.get("power_w", 0),
        quality=pb.QUALITY_INVALID if invalid else pb.QUALITY_VALID,
        flags=flags,
    )


def readings_messages(
    source: str, readings: Sequence[pb.Reading], *, producer: str, emitted_at_ms: int, per_message: int
) -> list[tuple[str, bytes, str]]:
    """(subject, payload, event id) of ReadingsBatch messages holding `readings` in order, `per_message` each.

    The event id is a digest of the readings a message holds, so the same
    readings published twice in the same grouping (a retry) are one message to
    the stream. The header is serialised apart and put first: a message's
    fields may be concatenated, so the readings are serialised only once.
    """
    subject = keyed(METER_READINGS, source)
    out = []
    for start in range(0, len(readings), per_message):
        body = events_pb2.ReadingsBatch(readings=readings[start : start + per_message]).SerializeToString()
        event_id = "readings-" + hashlib.sha256(body).hexdigest()[:40]
        header = events_pb2.ReadingsBatch(
            header=events_pb2.EventHeader(event_id=event_id, emitted_at_ms=emitted_at_ms, producer=producer)
        ).SerializeToString()
        out.append((subject, header + body, event_id))
    return out


def interval_energy_messages(
    interval: Interval,
    rows: Sequence[tuple[MeterIntervalEnergy, MeterConfig]],
    *,
    producer: str,
    emitted_at_ms: int,
    per_message: int,
) -> list[tuple[str, bytes, str]]:
    """(subject, payload, event id) of the IntervalEnergy messages of one interval, meters sorted by id.

    Each meter's energy for an interval is released exactly once (with the
    state that released it, in one transaction), so the messages of one
    interval hold disjoint meters; the event id names the interval and a
    digest of its meters, so relaying a message again is a duplicate.
    """
    subject = keyed(INTERVAL_ENERGY, interval.start_s)
    ordered = sorted(rows, key=lambda row: row[0].meter_id)
    out = []
    for start in range(0, len(ordered), per_message):
        chunk = ordered[start : start + per_message]
        digest = hashlib.sha256("\n".join(energy.meter_id for energy, _ in chunk).encode()).hexdigest()[:16]
        event_id = f"interval-energy-{interval.start_s}-{digest}"
        event = events_pb2.IntervalEnergy(
            header=events_pb2.EventHeader(event_id=event_id, emitted_at_ms=emitted_at_ms, producer=producer),
            interval=common_pb2.Interval(start_s=interval.start_s, length_s=interval.length_s),
            meters=[
                events_pb2.MeterIntervalEnergy(
                    meter_id=energy.meter_id,
                    participant_id=config.participant_id,
                    node_id=config.node_id,
                    import_wh=energy.import_wh,
                    export_wh=energy.export_wh,
                    flag=ENERGY_FLAGS[energy.quality],
                )
                for energy, config in chunk
            ],
        )
        out.append((subject, event.SerializeToString(), event_id))
    return out
