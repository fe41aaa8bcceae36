"""Validation flags bad readings without losing energy; interval energy is exact and telescopes."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.domain.intervals import Interval
from services.meter_ingest.domain.interval_energy import (
    CounterPoint,
    EnergyQuality,
    EnergyRules,
    IntervalEnergyTracker,
    MeterEnergyPipeline,
    Segment,
    interval_energy,
    intervals_between,
)
from services.meter_ingest.domain.quantities import Quality, QuantityValue
from services.meter_ingest.domain.readings import MeterReading
from services.meter_ingest.domain.vee import (
    CounterReset,
    EpochPoint,
    MeterValidator,
    QuantityLimits,
    ReadingFlag,
    VeeSettings,
    limits_from_map,
)
from services.meter_ingest.maps import load_register_map

T0 = 1_750_000_100  # 400 s before an interval boundary: T0 % 900 == 500
LIMITS = {
    "energy_import_wh": QuantityLimits(range=(0, 1e10), max_rate_w=20_000),
    "energy_export_wh": QuantityLimits(range=(0, 1e10), max_rate_w=20_000),
    "power_w": QuantityLimits(range=(-20_000, 20_000)),
    "voltage_l1_v": QuantityLimits(range=(0, 300)),
}


def _reading(t: float, imp: int | None, exp: int | None = 0, **extra: QuantityValue) -> MeterReading:
    values = {
        "energy_import_wh": QuantityValue(imp) if imp is not None else QuantityValue.invalid(Quality.NAN),
        "energy_export_wh": QuantityValue(exp) if exp is not None else QuantityValue.invalid(Quality.NAN),
        **extra,
    }
    return MeterReading("m1", t, values)


def _validator(**settings_kw: float) -> MeterValidator:
    return MeterValidator("m1", LIMITS, VeeSettings(**settings_kw))  # type: ignore[arg-type]


def test_a_duplicate_reading_is_dropped_and_counted() -> None:
    v = _validator()
    assert v.validate(_reading(T0, 1000)) is not None
    assert v.validate(_reading(T0, 1000)) is None
    assert v.validate(_reading(T0 - 5, 990)) is None
    assert (v.stats.duplicates_dropped, v.stats.stale_dropped) == (1, 1)


def test_a_counter_that_briefly_reads_zero_is_flagged_and_costs_no_energy() -> None:
    pipeline = MeterEnergyPipeline(_validator())
    readings = [
        (T0, 10_000),
        (T0 + 300, 10_300),
        (T0 + 600, 0),
        (T0 + 900, 10_900),
        (T0 + 1200, 11_200),
        (T0 + 1500, 11_500),
    ]
    flagged = []
    validated = None
    for t, imp in readings:
        validated = pipeline.ingest(_reading(t, imp))
        assert validated is not None
        flagged.append(validated.values["energy_import_wh"].quality)
    assert flagged[2] is Quality.COUNTER_BACKWARDS
    assert validated is not None
    assert validated.counter_wh["energy_import_wh"] == 11_500
    energies = [e for e in pipeline.pop_interval_energy() if e.counter == "energy_import_wh"]
    assert [e.energy_wh for e in energies] == [900]


def test_a_counter_jump_beyond_the_maximum_power_is_flagged_and_ignored() -> None:
    v = _validator()
    v.validate(_reading(T0, 10_000))
    jumped = v.validate(_reading(T0 + 10, 10_000_000))
    assert jumped is not None and jumped.values["energy_import_wh"].quality is Quality.COUNTER_JUMP
    ok = v.validate(_reading(T0 + 20, 10_050))
    assert ok is not None and ok.counter_wh["energy_import_wh"] == 10_050


def test_a_counter_reset_without_an_event_stays_invalid_until_the_event() -> None:
    pipeline = MeterEnergyPipeline(_validator())
    pipeline.ingest(_reading(T0, 50_000))
    pipeline.ingest(_reading(T0 + 400, 50_400))
    for k in range(3):
        r = pipeline.ingest(_reading(T0 + 500 + k * 100, 10 + k * 100))
        assert r is not None and r.values["energy_import_wh"].quality is Quality.COUNTER_BACKWARDS
    pipeline.reset(CounterReset("m1", T0 + 850, counters=("energy_import_wh",)))
    r = pipeline.ingest(_reading(T0 + 900, 410))
    assert r is not None and r.values["energy_import_wh"].ok
    assert ReadingFlag.EPOCH_START in r.flags and r.epochs["energy_import_wh"] == 1
    pipeline.ingest(_reading(T0 + 2000, 1510))
    energies = [e for e in pipeline.pop_interval_energy() if e.counter == "energy_import_wh"]
    # The interval holding the reset only counts what both epochs saw, and says so.
    assert energies[0].quality is EnergyQuality.ESTIMATED
    assert all(e.energy_wh >= 0 for e in energies)
    assert sum(e.energy_wh for e in energies) <= (50_400 - 50_000) + (1510 - 410)


def test_a_replacement_with_final_and_initial_readings_loses_no_energy() -> None:
    pipeline = MeterEnergyPipeline(_validator())
    pipeline.ingest(_reading(T0 + 400, 50_000))  # T0 + 400 is on a boundary
    pipeline.reset(
        CounterReset(
            "m1",
            T0 + 700,
            kind="replacement",
            counters=("energy_import_wh",),
            final_wh={"energy_import_wh": 50_300},
            initial_wh={"energy_import_wh": 5},
        )
    )
    pipeline.ingest(_reading(T0 + 1300, 605))
    (energy,) = [e for e in pipeline.pop_interval_energy() if e.counter == "energy_import_wh"]
    assert energy.interval == Interval(T0 + 400)
    assert energy.energy_wh == 300 + 600
    assert energy.quality is EnergyQuality.MEASURED


def test_a_declared_rollover_is_unwrapped_not_rejected() -> None:
    limits = {"energy_import_wh": QuantityLimits(max_rate_w=10_000, rollover_wh=1_000_000)}
    v = MeterValidator("m1", limits)
    v.validate(_reading(T0, 999_900))
    r = v.validate(_reading(T0 + 60, 50))
    assert r is not None and r.values["energy_import_wh"].ok
    assert r.counter_wh["energy_import_wh"] == 1_000_050


def test_out_of_range_values_are_flagged() -> None:
    v = _validator()
    r = v.validate(_reading(T0, 10, voltage_l1_v=QuantityValue(480.0), power_w=QuantityValue(-1500)))
    assert r is not None
    assert r.values["voltage_l1_v"].quality is Quality.OUT_OF_RANGE
    assert r.values["power_w"].ok


def test_clock_skew_is_flagged_and_such_counters_are_not_used_for_energy() -> None:
    v = _validator(max_clock_skew_s=30)
    skewed = MeterReading("m1", T0, {"energy_import_wh": QuantityValue(10)}, received_at_s=T0 + 120)
    r = v.validate(skewed)
    assert r is not None and ReadingFlag.CLOCK_SKEW in r.flags and not r.counter_wh


def test_a_gap_between_usable_readings_is_flagged() -> None:
    v = _validator(gap_s=300)
    v.validate(_reading(T0, 10))
    r = v.validate(_reading(T0 + 1000, 20))
    assert r is not None and ReadingFlag.GAP in r.flags


def test_limits_come_from_the_register_map() -> None:
    limits = limits_from_map(load_register_map("eastron_sdm630_v2"))
    assert limits["energy_import_wh"].max_rate_w == 100_000
    assert limits["frequency_hz"].range == (45, 65)


# --------------------------------------------------------------------------- interval energy


def test_a_boundary_between_two_readings_is_interpolated_and_rounded_half_to_even() -> None:
    segment = Segment([CounterPoint(0.0, 0), CounterPoint(4.0, 10)])
    assert segment.at(1.0, EnergyRules()) == (2, EnergyQuality.MEASURED)  # 2.5 → 2
    assert segment.at(3.0, EnergyRules())[0] == 8  # 7.5 → 8


def test_boundary_quality_follows_the_span_between_readings() -> None:
    rules = EnergyRules(measured_span_s=120, interpolation_span_s=7200)
    segment = Segment(
        [CounterPoint(0.0, 0), CounterPoint(100.0, 1), CounterPoint(3000.0, 2), CounterPoint(20000.0, 3)]
    )
    assert segment.at(50.0, rules)[1] is EnergyQuality.MEASURED
    assert segment.at(1000.0, rules)[1] is EnergyQuality.INTERPOLATED
    assert segment.at(10000.0, rules)[1] is EnergyQuality.ESTIMATED


def test_intervals_not_covered_by_readings_on_both_sides_are_not_computed() -> None:
    segment = Segment([CounterPoint(T0, 0), CounterPoint(T0 + 1400, 100)])
    result = interval_energy([segment], [Interval(T0 - 500), Interval(T0 + 400), Interval(T0 + 1300)])
    assert [e.interval for e in result] == [Interval(T0 + 400)]


@st.composite
def _counter_path(draw: st.DrawFn) -> list[CounterPoint]:
    n = draw(st.integers(2, 30))
    gaps = draw(st.lists(st.floats(0.001, 2500, allow_nan=False), min_size=n - 1, max_size=n - 1))
    rises = draw(st.lists(st.integers(0, 5000), min_size=n - 1, max_size=n - 1))
    t = float(draw(st.integers(T0 - 3000, T0 + 3000))) + draw(st.floats(0, 1))
    v = draw(st.integers(0, 10**9))
    points = [CounterPoint(t, v)]
    for gap, rise in zip(gaps, rises, strict=True):
        t, v = t + gap, v + rise
        points.append(CounterPoint(t, v))
    return points


@settings(max_examples=200, deadline=None)
@given(_counter_path(), st.sampled_from([60, 300, 900]))
def test_interval_energies_sum_to_the_counter_difference_and_never_go_negative(
    points: list[CounterPoint], length_s: int
) -> None:
    segment = Segment(points)
    intervals = intervals_between(points[0].t_s, points[-1].t_s, length_s)
    result = interval_energy([segment], intervals)
    assert [e.interval for e in result] == intervals
    assert all(e.energy_wh >= 0 for e in result)
    if intervals:
        rules = EnergyRules()
        first = segment.at(intervals[0].start_s, rules)[0]
        last = segment.at(intervals[-1].end_s, rules)[0]
        assert sum(e.energy_wh for e in result) == last - first
        # The boundary values stay between the readings around them, so the parts
        # before the first and after the last boundary are not negative either.
        assert points[0].value_wh <= first <= last <= points[-1].value_wh


@settings(max_examples=100, deadline=None)
@given(_counter_path(), st.sampled_from([300, 900]))
def test_readings_on_the_outer_boundaries_make_the_sum_equal_the_reading_difference(
    points: list[CounterPoint], length_s: int
) -> None:
    start = (int(points[0].t_s) // length_s + 1) * length_s
    shift = start - points[0].t_s
    moved = [CounterPoint(float(start), points[0].value_wh)]
    moved += [CounterPoint(p.t_s + shift, p.value_wh) for p in points[1:]]
    end = (int(moved[-1].t_s) // length_s + 1) * length_s
    moved.append(CounterPoint(float(end), moved[-1].value_wh + 7))
    result = interval_energy([Segment(moved)], intervals_between(start, end, length_s))
    assert len(result) == (end - start) // length_s
    assert sum(e.energy_wh for e in result) == moved[-1].value_wh - moved[0].value_wh


@settings(max_examples=100, deadline=None)
@given(_counter_path(), st.lists(st.integers(1, 6), min_size=1, max_size=20))
def test_the_tracker_emits_each_interval_once_with_the_same_energy_as_the_batch(
    points: list[CounterPoint], chunk_sizes: list[int]
) -> None:
    tracker = IntervalEnergyTracker("m1", interval_s=300, counters=("energy_import_wh",))
    emitted = []
    i = 0
    sizes = iter(chunk_sizes * len(points))
    while i < len(points):
        step = next(sizes)
        tracker.add_points(EpochPoint("energy_import_wh", 0, p.t_s, p.value_wh) for p in points[i : i + step])
        emitted.extend(tracker.pop_complete())
        i += step
    batch = interval_energy([Segment(points)], intervals_between(points[0].t_s, points[-1].t_s, 300))
    assert [(e.interval, e.energy_wh, e.quality) for e in emitted] == [
        (e.interval, e.energy_wh, e.quality) for e in batch
    ]


@settings(max_examples=100, deadline=None)
@given(_counter_path(), _counter_path(), st.booleans())
def test_intervals_across_two_epochs_sum_to_what_each_epoch_saw(
    first: list[CounterPoint], second_raw: list[CounterPoint], touching: bool
) -> None:
    shift = first[-1].t_s - second_raw[0].t_s + (0.0 if touching else 37.5)
    second = [CounterPoint(p.t_s + shift, p.value_wh) for p in second_raw]
    if touching:
        second[0] = CounterPoint(first[-1].t_s, second[0].value_wh)
    segments = [Segment(first), Segment(second)]
    start = (int(first[0].t_s) // 300 + 1) * 300
    end = (int(second[-1].t_s) // 300) * 300
    intervals = [Interval(t, 300) for t in range(start, end, 300)]
    result = interval_energy(segments, intervals)
    assert all(e.energy_wh >= 0 for e in result)
    if not intervals:
        return
    rules = EnergyRules()

    def seen(segment: Segment) -> int:
        lo, hi = max(float(start), segment.first_t), min(float(end), segment.last_t)
        if lo > hi:
            return 0
        return segment.at(hi, rules)[0] - segment.at(lo, rules)[0]

    assert sum(e.energy_wh for e in result) == seen(segments[0]) + seen(segments[1])
    # The tracker, fed point by point across the epoch change, emits exactly the same intervals.
    tracker = IntervalEnergyTracker("m1", interval_s=300, counters=("energy_import_wh",))
    emitted = []
    for epoch, points in enumerate((first, second)):
        for p in points:
            tracker.add_points([EpochPoint("energy_import_wh", epoch, p.t_s, p.value_wh)])
            emitted.extend(tracker.pop_complete())
    assert [(e.interval, e.energy_wh, e.quality) for e in emitted] == [
        (e.interval, e.energy_wh, e.quality) for e in result
    ]
    if not touching:
        hole = [e for e in result if e.interval.start_s < second[0].t_s and e.interval.end_s > first[-1].t_s]
        assert all(e.quality is EnergyQuality.ESTIMATED for e in hole)


def test_exact_fractions_make_interpolation_independent_of_float_rounding() -> None:
    segment = Segment([CounterPoint(0.1, 0), CounterPoint(0.7, 3)])
    value, _ = segment.at(0.4, EnergyRules())
    exact = Fraction(0.4) - Fraction(0.1)
    assert value == round(3 * exact / (Fraction(0.7) - Fraction(0.1)))


def test_a_segment_refuses_points_that_go_back_in_time_or_value() -> None:
    segment = Segment([CounterPoint(10.0, 5)])
    with pytest.raises(ValueError, match="not after"):
        segment.append(CounterPoint(9.0, 6))
    with pytest.raises(ValueError, match="below"):
        segment.append(CounterPoint(11.0, 4))
