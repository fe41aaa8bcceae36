"""Readings meet their meters: pushed-reading rules, published flags and qualities, message ids and grouping."""

from __future__ import annotations

import nacl.signing

from services.domain.credentials import b64url
from services.domain.ids import participant_id_from_public_key
from services.domain.intervals import Interval
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
from services.meter_ingest.adapters.convert import interval_energy_messages, readings_messages
from services.meter_ingest.adapters.ingest import Ingestor
from services.meter_ingest.domain.interval_energy import EnergyQuality, MeterIntervalEnergy
from services.meter_ingest.domain.meter_config import parse_meters_config
from services.meter_ingest.domain.quantities import Quality, QuantityValue
from services.meter_ingest.domain.readings import MeterReading
from services.meter_ingest.domain.vee import VeeSettings
from services.meter_ingest.maps import load_register_map
from services.meter_ingest.meters import ConfiguredMeter
from services.platform.metrics import Metrics

T0 = 1_750_000_200
MS = 1000


class FixedClock:
    def __init__(self, now_s: float) -> None:
        self.t = now_s

    def now_s(self) -> float:
        return self.t

    async def sleep_until(self, t_s: float) -> None:
        self.t = max(self.t, t_s)


def _ingestor(clock: FixedClock) -> tuple[Ingestor, str, Metrics]:
    public = bytes(nacl.signing.SigningKey.generate().verify_key)
    configs = parse_meters_config(
        {
            "meters": [
                {
                    "meter_id": meter_id,
                    "participant_id": f"owner-{meter_id}",
                    "node_id": "n1",
                    "map": "eastron_sdm120",
                    "push": {"public_keys": [b64url(public)]},
                }
                for meter_id in ("m-a", "m-b")
            ]
            + [
                {
                    "meter_id": "m-polled",
                    "participant_id": "owner-polled",
                    "node_id": "n1",
                    "map": "eastron_sdm120",
                    "modbus": {"host": "127.0.0.1", "port": 5020, "unit": 1},
                }
            ]
        }
    )
    rmap = load_register_map("eastron_sdm120")
    metrics = Metrics("meter_ingest")
    ingestor = Ingestor(
        [ConfiguredMeter(config, rmap) for config in configs],
        interval_s=300,
        vee=VeeSettings(),
        clock=clock,
        metrics=metrics,
    )
    return ingestor, participant_id_from_public_key(public), metrics


def _reading(meter_id: str, t_s: float, imp: int = 10_000, exp: int = 2_000, **fields: object) -> pb.Reading:
    return pb.Reading(
        meter_id=meter_id,
        time_ms=round(t_s * MS),
        energy_import_wh=imp,
        energy_export_wh=exp,
        power_w=fields.pop("power_w", 400),  # type: ignore[arg-type]
        quality=fields.pop("quality", pb.QUALITY_VALID),  # type: ignore[arg-type]
        **fields,  # type: ignore[arg-type]
    )


def _sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


def test_only_the_callers_meters_are_taken_and_others_are_counted_not_published() -> None:
    clock = FixedClock(T0)
    ingestor, caller, metrics = _ingestor(clock)
    outcome = ingestor.accept_pushed(
        caller,
        [_reading("m-a", T0), _reading("m-polled", T0), _reading("m-x", T0), _reading("m-a", T0)],
    )
    assert [r.meter_id for r in outcome.readings] == ["m-a"]
    assert outcome.rejected == 3
    assert outcome.errors[0] == "readings[1]: meter 'm-polled' may not be pushed with this caller's key"
    assert "readings[3]: meter 'm-a' at" in outcome.errors[2] and "duplicate" in outcome.errors[2]
    assert _sample(metrics, "p2pgrid_meter_invalid_total", meter="m-polled", reason="not_permitted") == 1
    # A meter that does not exist is not given a label of its own.
    assert _sample(metrics, "p2pgrid_meter_invalid_total", meter="unknown", reason="not_permitted") == 1
    assert _sample(metrics, "p2pgrid_meter_readings_total", source="push", quality="rejected") == 2
    assert _sample(metrics, "p2pgrid_meter_readings_total", source="push", quality="duplicate") == 1
    stranger = ingestor.accept_pushed("p-somebody-else", [_reading("m-b", T0)])
    assert (stranger.readings, stranger.rejected) == ([], 1)


def test_malformed_readings_are_refused_with_the_field_and_the_rule() -> None:
    clock = FixedClock(T0)
    ingestor, caller, _metrics = _ingestor(clock)
    outcome = ingestor.accept_pushed(
        caller,
        [
            _reading("m-a", T0, quality=pb.QUALITY_UNSPECIFIED),
            pb.Reading(meter_id="m-a", quality=pb.QUALITY_VALID),
        ],
    )
    assert outcome.readings == []
    assert outcome.errors == [
        "readings[0].quality: must be QUALITY_VALID, QUALITY_INVALID or QUALITY_ESTIMATED",
        "readings[1].time_ms: must be positive Unix milliseconds",
    ]


def test_a_pushed_reading_is_published_invalid_when_any_value_is_unusable_and_says_which() -> None:
    clock = FixedClock(T0 + 25)
    ingestor, caller, metrics = _ingestor(clock)
    outcome = ingestor.accept_pushed(
        caller,
        [
            _reading("m-a", T0, imp=10_000),
            _reading("m-a", T0 + 10, imp=10_001, flags=["power_w:nan"]),  # the source says power is unusable
            _reading("m-a", T0 + 20, imp=9_000),  # backwards without a reset
            _reading("m-a", T0 + 30, imp=10_002, power_w=80_000),  # beyond the map's range
            _reading("m-a", T0 + 40, imp=10_003, quality=pb.QUALITY_ESTIMATED),
            _reading("m-a", T0 + 50, imp=10_004, quality=pb.QUALITY_INVALID, flags=["sentinel"]),
            _reading("m-a", T0 + 200, imp=10_005),  # the meter's clock is 175 s ahead of ours
            _reading("m-a", T0 + 55, imp=10_006),  # a wrong timestamp does not make the next reading old
        ],
    )
    published = [(r.quality, list(r.flags)) for r in outcome.readings]
    assert published == [
        (pb.QUALITY_VALID, ["epoch_start"]),
        (pb.QUALITY_INVALID, ["power_w:nan"]),
        (pb.QUALITY_INVALID, ["energy_import_wh:counter_backwards"]),
        (pb.QUALITY_INVALID, ["power_w:out_of_range"]),
        (pb.QUALITY_ESTIMATED, []),
        (pb.QUALITY_INVALID, ["sentinel"]),
        (pb.QUALITY_INVALID, ["clock_skew"]),
        (pb.QUALITY_VALID, []),
    ]
    assert _sample(metrics, "p2pgrid_meter_invalid_total", meter="m-a", reason="nan") == 1
    assert _sample(metrics, "p2pgrid_meter_invalid_total", meter="m-a", reason="counter_backwards") == 1
    assert _sample(metrics, "p2pgrid_meter_readings_total", source="push", quality="invalid") == 5
    # Each usable counter counts for energy (also beside an implausible power); the backwards one, the
    # estimated, the invalid and the skewed readings' counters do not.
    assert ingestor.entries["m-a"].pipeline.validator.counter_state("energy_import_wh") == (0, 10_006)


def test_a_counter_reset_starts_a_new_epoch_at_the_reading_and_may_not_go_back_in_time() -> None:
    clock = FixedClock(T0 + 20)
    ingestor, caller, _metrics = _ingestor(clock)
    outcome = ingestor.accept_pushed(
        caller,
        [
            _reading("m-a", T0, imp=10_000),
            _reading("m-a", T0 + 10, imp=5, counter_reset=True),
            _reading("m-a", T0 + 5, imp=6, counter_reset=True),
        ],
    )
    assert [list(r.flags) for r in outcome.readings] == [["epoch_start"], ["epoch_start"]]
    assert outcome.errors == [
        "readings[2].counter_reset: reset at 1750000205.0 is before the last reading at 1750000210.0"
    ]
    assert ingestor.entries["m-a"].pipeline.validator.counter_state("energy_import_wh") == (1, 5)


def test_a_polled_reading_names_each_unusable_value_and_is_then_invalid() -> None:
    clock = FixedClock(T0)
    ingestor, _caller, metrics = _ingestor(clock)
    values = {
        "energy_import_wh": QuantityValue(12_345),
        "energy_export_wh": QuantityValue(678),
        "power_w": QuantityValue.invalid(Quality.NAN),
        "voltage_l1_v": QuantityValue(231.5),
    }
    message = ingestor.accept_polled(MeterReading("m-polled", T0 + 0.0004, values))
    assert message is not None
    assert (message.time_ms, message.energy_import_wh, message.energy_export_wh, message.power_w) == (
        T0 * MS,
        12_345,
        678,
        0,
    )
    assert (message.quality, list(message.flags)) == (pb.QUALITY_INVALID, ["epoch_start", "power_w:nan"])
    assert (
        ingestor.accept_polled(MeterReading("m-polled", T0 + 0.0001, values)) is None
    )  # the same millisecond
    assert _sample(metrics, "p2pgrid_meter_polls_total", outcome="ok") == 2


def test_a_readings_message_has_a_header_first_and_an_id_that_follows_its_content() -> None:
    readings = [_reading("m-a", T0 + k) for k in range(5)]
    first = readings_messages("push", readings, producer="mi", emitted_at_ms=1, per_message=2)
    again = readings_messages("push", readings, producer="mi", emitted_at_ms=2, per_message=2)
    assert [subject for subject, _, _ in first] == ["p2pgrid.metering.readings.push"] * 3
    assert [event_id for _, _, event_id in first] == [event_id for _, _, event_id in again]
    assert len({event_id for _, _, event_id in first}) == 3
    batches = [events_pb2.ReadingsBatch.FromString(payload) for _, payload, _ in first]
    assert [b.header.event_id for b in batches] == [event_id for _, _, event_id in first]
    assert [len(b.readings) for b in batches] == [2, 2, 1]
    assert [r.time_ms for b in batches for r in b.readings] == [r.time_ms for r in readings]


def test_interval_energy_messages_sort_meters_and_name_the_interval_in_subject_and_id() -> None:
    interval = Interval(T0, 300)
    configs = parse_meters_config(
        {
            "meters": [
                {
                    "meter_id": meter_id,
                    "participant_id": f"p-{meter_id}",
                    "node_id": "n7",
                    "map": "eastron_sdm120",
                    "modbus": {"host": "h", "unit": i + 1},
                }
                for i, meter_id in enumerate(["m-3", "m-1", "m-2"])
            ]
        }
    )
    rows = [
        (MeterIntervalEnergy(c.meter_id, interval, 10 * i, i, EnergyQuality(i)), c)
        for i, c in enumerate(configs)
    ]
    messages = interval_energy_messages(interval, rows, producer="mi", emitted_at_ms=5, per_message=2)
    assert [subject for subject, _, _ in messages] == [f"p2pgrid.metering.energy.{T0}"] * 2
    assert all(event_id.startswith(f"interval-energy-{T0}-") for _, _, event_id in messages)
    events = [events_pb2.IntervalEnergy.FromString(payload) for _, payload, _ in messages]
    assert [[m.meter_id for m in e.meters] for e in events] == [["m-1", "m-2"], ["m-3"]]
    m1 = events[0].meters[0]
    assert (m1.participant_id, m1.node_id, m1.import_wh, m1.export_wh) == ("p-m-1", "n7", 10, 1)
    assert m1.flag == events_pb2.ENERGY_FLAG_INTERPOLATED
    assert (events[1].interval.start_s, events[1].interval.length_s) == (T0, 300)
    again = interval_energy_messages(
        interval, list(reversed(rows)), producer="mi", emitted_at_ms=9, per_message=2
    )
    assert [event_id for _, _, event_id in again] == [event_id for _, _, event_id in messages]
