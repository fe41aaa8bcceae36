"""The pipeline's way out for the service: release after the metering delay, snapshots, and the push short path."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from services.meter_ingest.domain.interval_energy import (
    ORDINARY,
    CounterPoint,
    EnergyQuality,
    MeterEnergyPipeline,
    MeterIntervalEnergy,
    Segment,
    interval_energy,
    intervals_between,
)
from services.meter_ingest.domain.vee import MeterValidator, QuantityLimits, ReadingFlag, VeeSettings

INTERVAL_S = 300
T0 = 1_750_000_200  # an interval boundary (T0 % 300 == 0)
LIMITS = {
    "energy_import_wh": QuantityLimits(range=(0, 1e10), max_rate_w=20_000),
    "energy_export_wh": QuantityLimits(range=(0, 1e10), max_rate_w=20_000),
    "power_w": QuantityLimits(range=(-20_000, 20_000)),
}
IMPORT, EXPORT = "energy_import_wh", "energy_export_wh"


def _pipeline(meter_id: str = "m1", gap_s: float = 3600) -> MeterEnergyPipeline:
    return MeterEnergyPipeline(MeterValidator(meter_id, LIMITS, VeeSettings(gap_s=gap_s)), INTERVAL_S)


def _values(imp: int | None, exp: int | None, power_w: int = 500) -> dict[str, int]:
    """The usable values of a pushed reading, in the order a Reading message carries them."""
    values = {}
    if imp is not None:
        values[IMPORT] = imp
    if exp is not None:
        values[EXPORT] = exp
    values["power_w"] = power_w
    return values


def test_an_interval_is_released_once_after_the_cutoff_passes_its_end() -> None:
    pipeline = _pipeline()
    for k in range(0, 13):  # a reading every 50 s from T0 to T0 + 600
        pipeline.ingest_values(T0 + 50 * k, None, _values(1_000 + 10 * k, 200 + 5 * k))
    assert pipeline.release(T0 + INTERVAL_S - 1) == []
    first = pipeline.release(T0 + INTERVAL_S)
    assert first == [MeterIntervalEnergy("m1", first[0].interval, 60, 30, EnergyQuality.MEASURED)]
    assert first[0].interval.start_s == T0
    assert pipeline.release(T0 + INTERVAL_S) == []
    (second,) = pipeline.release(T0 + 10 * INTERVAL_S)
    assert (second.interval.start_s, second.import_wh, second.export_wh) == (T0 + INTERVAL_S, 60, 30)


def test_a_lagging_counter_holds_the_meters_interval_back_until_it_reports_again() -> None:
    pipeline = _pipeline()
    pipeline.ingest_values(T0, None, _values(1_000, 200))
    pipeline.ingest_values(T0 + 100, None, _values(1_010, 210))
    # After the boundary only the import counter is usable for a while (export NaN, say).
    pipeline.ingest_values(T0 + 400, None, _values(1_040, None))
    assert pipeline.release(T0 + 10_000) == []
    pipeline.ingest_values(T0 + 500, None, _values(1_050, 240))
    (energy,) = pipeline.release(T0 + 10_000)
    # Export is interpolated between 210 Wh at T0 + 100 and 240 Wh at T0 + 500.
    assert (energy.import_wh, energy.export_wh) == (1_030 - 1_000, 225 - 200)
    assert energy.quality is EnergyQuality.INTERPOLATED and energy.missing == ()


def test_a_counter_that_started_after_the_interval_counts_zero_and_marks_it_estimated() -> None:
    pipeline = _pipeline()
    pipeline.ingest_values(T0, None, _values(1_000, None))
    pipeline.ingest_values(T0 + 100, None, _values(1_010, 205))  # export starts after the interval did
    pipeline.ingest_values(T0 + INTERVAL_S, None, _values(1_030, 215))
    (energy,) = pipeline.release(T0 + INTERVAL_S)
    assert (energy.import_wh, energy.export_wh) == (30, 0)
    assert energy.quality is EnergyQuality.ESTIMATED and energy.missing == (EXPORT,)


# A pushed reading: time step (s, may be 0 or negative), import and export steps (may go back or jump),
# power, and how far the meter's clock is off.
# An export step of EDGE (or EDGE + 1) rises exactly as much as the maximum power allows (or 1 Wh more).
EDGE = 10**9
_step = st.tuples(
    st.sampled_from([0.0, -5.0, 1.0, 7.5, 60.0, 290.0, 700.0]),
    st.integers(-50, 40),
    st.sampled_from([0, 1, 3, 20, -400, 50_000, EDGE, EDGE + 1]),
    st.sampled_from([0, 500, -3_000, 90_000]),
    st.sampled_from([0.0, 0.0, 0.0, 45.0]),
)


def _export_after(pipeline: MeterEnergyPipeline, t_s: float, exp: int, d_exp: int) -> int:
    if d_exp < EDGE:
        return max(0, exp + d_exp)
    _epoch, last_wh, last_t, _offset = pipeline.snapshot()["validator"]["counters"][EXPORT]
    if last_wh is None or last_t is None or t_s <= last_t:
        return exp
    return int(last_wh + int(20_000 * (t_s - last_t) / 3600) + 100 + (d_exp - EDGE))


@settings(max_examples=300, deadline=None)
@given(st.lists(_step, min_size=1, max_size=60))
def test_the_short_path_for_pushed_readings_gives_what_the_general_rules_give(
    steps: list[tuple[float, int, int, int, float]],
) -> None:
    fast, general = _pipeline(gap_s=300), _pipeline(gap_s=300)
    t, imp, exp = float(T0 + 17), 10_000, 5_000
    for dt, d_imp, d_exp, power_w, skew in steps:
        t, imp = t + dt, max(0, imp + d_imp)
        exp = _export_after(general, t, exp, d_exp)
        got = fast.ingest_carried(t, t + skew, imp, exp, power_w)
        want = general.ingest_values(t, t + skew, _values(imp, exp, power_w))
        assert (got is None) == (want is None)
        if got is not None and want is not None:
            assert (got.flags, got.problems) == (want.flags, want.problems)
            if got is ORDINARY:
                assert not want.flags and not want.problems
        assert fast.snapshot() == general.snapshot()
        assert fast.release(t) == general.release(t)


@settings(max_examples=150, deadline=None)
@given(st.lists(_step, min_size=2, max_size=60), st.data())
def test_a_snapshot_taken_anywhere_continues_with_the_same_energies(
    steps: list[tuple[float, int, int, int, float]], data: st.DataObject
) -> None:
    cut = data.draw(st.integers(0, len(steps)))
    uninterrupted, restarted = _pipeline(), _pipeline()
    released_once: list[MeterIntervalEnergy] = []
    released_twice: list[MeterIntervalEnergy] = []
    t, imp, exp = float(T0 + 3), 10_000, 5_000
    for i, (dt, d_imp, d_exp, power_w, skew) in enumerate(steps):
        if i == cut:
            state = json.loads(json.dumps(restarted.snapshot()))
            restarted = _pipeline()
            restarted.restore(state)
        t, imp = t + abs(dt), imp + abs(d_imp)
        exp = _export_after(uninterrupted, t, exp, abs(d_exp))
        uninterrupted.ingest_carried(t, t + skew, imp, exp, power_w)
        restarted.ingest_carried(t, t + skew, imp, exp, power_w)
        released_once += uninterrupted.release(t - 30)
        released_twice += restarted.release(t - 30)
    assert released_twice == released_once
    assert restarted.snapshot() == uninterrupted.snapshot()


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.001, 400, allow_nan=False), st.integers(0, 2_000)), min_size=2, max_size=80
    ),
    st.sampled_from([60, 300, 900]),
)
def test_a_thinned_segment_gives_the_same_interval_energy_as_every_point(
    steps: list[tuple[float, int]], length_s: int
) -> None:
    t, value = float(T0) - 1_000.5, 0
    points = []
    for gap, rise in steps:
        t, value = t + gap, value + rise
        points.append(CounterPoint(t, value))
    thinned = Segment(points, thin_to_boundaries_s=length_s)
    intervals = intervals_between(points[0].t_s, points[-1].t_s, length_s)
    assert interval_energy([thinned], intervals) == interval_energy([Segment(points)], intervals)
    assert len(thinned) <= 3 * (len(intervals) + 2)


def test_an_ordinary_reading_carries_no_flags_but_the_first_of_an_epoch_does() -> None:
    pipeline = _pipeline()
    first = pipeline.ingest_carried(T0, T0, 1_000, 200, 400)
    assert first is not None and first.flags == (ReadingFlag.EPOCH_START,)
    assert pipeline.ingest_carried(T0 + 5, T0 + 5, 1_001, 200, 400) is ORDINARY
    assert pipeline.ingest_carried(T0 + 5, T0 + 5, 1_001, 200, 400) is None  # duplicate
