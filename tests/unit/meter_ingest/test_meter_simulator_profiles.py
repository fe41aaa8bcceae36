"""Simulated meters: counters grow exactly as their power says, and faults change what the registers hold."""

from __future__ import annotations

import math

from services.meter_ingest.domain.codec import RegisterImage, decode
from services.meter_ingest.domain.quantities import Quality
from services.meter_ingest.maps import load_register_map
from services.meter_ingest.simulator import BUCKET_S, FaultKind, Profile, ProfileMeter, vector_meters


class SteppingClock:
    """A clock tests move by hand."""

    def __init__(self, t_s: float) -> None:
        self.t_s = t_s

    def now_s(self) -> float:
        return self.t_s

    async def sleep_until(self, t_s: float) -> None:
        self.t_s = max(self.t_s, t_s)


def _read(meter: ProfileMeter) -> dict[str, object]:
    registers = [0] * 0x4C
    meter.refresh(4, 0, registers)
    image = RegisterImage()
    image.put(4, 0, registers)
    return {
        name: value.value if value.ok else value.quality for name, value in decode(meter.map, image).items()
    }


def test_counters_rise_by_the_integral_of_the_power_the_meter_shows() -> None:
    rmap = load_register_map("eastron_sdm630_v2")
    clock = SteppingClock(1_750_068_000.0)  # 10:00 UTC, PV and load both present
    meter = ProfileMeter(rmap, 1, clock, import_wh=5_000_000.0, export_wh=1_000_000.0)
    start = meter.values()
    import_wh = export_wh = 0.0
    for _ in range(360):  # one hour in 10-second steps, sampling the power the registers show
        power_w = meter.values()["power_w"]
        assert power_w is not None
        clock.t_s += BUCKET_S
        import_wh += max(power_w, 0.0) * BUCKET_S / 3600
        export_wh += max(-power_w, 0.0) * BUCKET_S / 3600
    end = meter.values()
    assert math.isclose(end["energy_import_wh"] - start["energy_import_wh"], import_wh, rel_tol=1e-9)  # type: ignore[operator]
    assert math.isclose(end["energy_export_wh"] - start["energy_export_wh"], export_wh, rel_tol=1e-9)  # type: ignore[operator]
    assert export_wh > 100 and import_wh >= 0


def test_phase_powers_add_up_and_currents_follow_power_over_voltage() -> None:
    meter = ProfileMeter(load_register_map("eastron_sdm630_v2"), 3, SteppingClock(1_750_070_000.0))
    values = meter.values()
    phases = [values[f"power_l{i}_w"] for i in (1, 2, 3)]
    assert math.isclose(sum(p for p in phases if p is not None), values["power_w"] or 0.0)
    for i in (1, 2, 3):
        current, power, voltage = (
            values[f"current_l{i}_a"],
            values[f"power_l{i}_w"],
            values[f"voltage_l{i}_v"],
        )
        assert current is not None and power is not None and voltage is not None
        assert math.isclose(current, abs(power) / voltage)


def test_faults_change_the_registers_and_end_after_their_reads() -> None:
    meter = ProfileMeter(
        load_register_map("eastron_sdm630_v2"), 1, SteppingClock(1_750_070_000.0), import_wh=123_456.0
    )
    normal = _read(meter)
    assert isinstance(normal["energy_import_wh"], int) and normal["energy_import_wh"] > 0
    meter.inject(FaultKind.NAN, reads=1)
    assert all(v is Quality.NAN for v in _read(meter).values())
    meter.inject(FaultKind.BACKWARDS, reads=1)
    assert _read(meter)["energy_import_wh"] == 0
    meter.inject(FaultKind.JUMP, reads=1)
    assert _read(meter)["energy_import_wh"] > 10**9  # type: ignore[operator]
    assert _read(meter)["energy_import_wh"] == normal["energy_import_wh"]
    meter.inject(FaultKind.COUNTER_RESET)
    assert _read(meter)["energy_import_wh"] == 0


def test_profiles_differ_between_meters_and_pv_is_zero_at_night() -> None:
    a, b = Profile.for_meter(1), Profile.for_meter(2)
    assert a.pv_peak_w != b.pv_peak_w
    midnight_bucket = int(1_750_032_000 // BUCKET_S)  # 00:00 UTC
    assert a.pv_w(midnight_bucket) == 0.0 and a.load_w(midnight_bucket) > 0


def test_vector_meters_use_the_vectors_unit_ids_or_number_from_one() -> None:
    assert [m.unit_id for m in vector_meters(load_register_map("sunspec_meter_203"))] == [200, 240]
    assert [m.unit_id for m in vector_meters(load_register_map("eastron_sdm630_v2"))] == [1, 2, 3]
