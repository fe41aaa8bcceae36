"""The poller survives a gateway going away, learns which registers a meter lacks, and reads every model."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict

import pytest

from services.domain.intervals import SimulatedClock
from services.meter_ingest.adapters.modbus_poller import (
    GatewayTarget,
    MeterTarget,
    ModbusPoller,
    PollerSettings,
    meters_for,
)
from services.meter_ingest.domain.codec import encode_values
from services.meter_ingest.domain.quantities import Quality
from services.meter_ingest.domain.readings import MeterReading
from services.meter_ingest.domain.vee import MeterValidator, limits_from_map
from services.meter_ingest.maps import load_register_map, load_shipped_maps
from services.meter_ingest.simulator import Gateway, StaticMeter, profile_meters


def test_a_gateway_that_goes_away_gives_unreachable_values_and_is_reconnected_when_back() -> None:
    rmap = load_register_map("eastron_sdm120")

    async def scenario() -> list[MeterReading]:
        clock = SimulatedClock(start_s=1_750_070_000.0, speedup=10, anchor_wall_s=time.time())
        gateway = Gateway(profile_meters(rmap, 2, clock, first_unit=1))
        port = await gateway.start()
        readings: list[MeterReading] = []

        async def sink(reading: MeterReading) -> None:
            readings.append(reading)

        target = GatewayTarget(
            "127.0.0.1", port, meters_for(rmap, (1, 2), poll_interval_s=0.05), timeout_s=0.2
        )
        settings = PollerSettings(reconnect_initial_s=0.05, reconnect_max_s=0.2, backoff_max_s=0.2)
        poller = ModbusPoller([target], sink, clock=clock, settings=settings)
        await poller.start()
        try:
            await asyncio.sleep(0.5)
            await gateway.stop()
            await asyncio.sleep(0.8)
            restarted = Gateway(profile_meters(rmap, 2, clock, first_unit=1), port=port)
            await restarted.start()
            await asyncio.sleep(1.2)
            await restarted.stop()
        finally:
            await poller.stop()
        return readings

    readings = asyncio.run(scenario())
    qualities = [r.values["energy_import_wh"].quality for r in readings if r.meter_id == "meter-1"]
    first_bad = next(i for i, q in enumerate(qualities) if q is not Quality.OK)
    assert first_bad > 0 and Quality.OK in qualities[first_bad:], qualities
    bad = set(qualities[first_bad : qualities.index(Quality.OK, first_bad)])
    assert bad <= {Quality.UNREACHABLE, Quality.TIMEOUT} and Quality.UNREACHABLE in bad
    assert all(r.value("energy_import_wh") is None for r in readings if not r.values["energy_import_wh"].ok)
    assert qualities[-1] is Quality.OK


def test_a_register_the_meter_lacks_costs_only_its_own_value() -> None:
    """A packed read across an address the meter refuses (exception 2) is probed once, then avoided."""
    rmap = load_register_map("eastron_sdm630_v2")
    values = {name: 1.0 for name in rmap.quantities} | {"energy_import_wh": 5_000, "energy_export_wh": 7_000}
    blocks = [
        b for b in encode_values(rmap, values) if b.address != rmap.quantities["power_l2_w"].field.address
    ]

    async def scenario() -> tuple[list[MeterReading], int]:
        meter = StaticMeter(1, blocks)
        gateway = Gateway([meter], fill_gaps=False)
        port = await gateway.start()
        readings: list[MeterReading] = []

        async def sink(reading: MeterReading) -> None:
            readings.append(reading)

        poller = ModbusPoller(
            [
                GatewayTarget(
                    "127.0.0.1", port, (MeterTarget("m", rmap, 1, poll_interval_s=0.05),), timeout_s=0.5
                )
            ],
            sink,
        )
        await poller.start()
        try:
            while len(readings) < 6:
                await asyncio.sleep(0.05)
        finally:
            await poller.stop()
            await gateway.stop()
        return readings, meter.reads

    readings, _ = asyncio.run(scenario())
    for reading in readings:
        assert reading.values["power_l2_w"].quality is Quality.EXCEPTION
        assert reading.value("energy_import_wh") == 5_000 and reading.value("power_l1_w") == 1
        assert sum(1 for v in reading.values.values() if not v.ok) == 1
    assert "not supported" in readings[-1].values["power_l2_w"].detail


@pytest.mark.parametrize("framer", ["socket", "rtu"])
def test_a_simulated_household_of_every_model_reads_back_valid_and_plausible(framer: str) -> None:
    async def scenario() -> dict[str, list[MeterReading]]:
        clock = SimulatedClock(start_s=1_750_075_200.0, speedup=60, anchor_wall_s=time.time())
        gateways: list[Gateway] = []
        targets: list[GatewayTarget] = []
        for rmap in load_shipped_maps():
            meters = profile_meters(rmap, 2, clock, first_unit=rmap.transport.unit_id)
            gateway = Gateway(meters, framer=framer)
            gateways.append(gateway)
            port = await gateway.start()
            units = [m.unit_id for m in meters]
            targets.append(
                GatewayTarget(
                    "127.0.0.1",
                    port,
                    meters_for(rmap, units, poll_interval_s=0.1, prefix=rmap.id),
                    framer=framer,  # type: ignore[arg-type]
                    timeout_s=0.5,
                    inter_request_gap_s=0.0,
                )
            )
        readings: dict[str, list[MeterReading]] = defaultdict(list)

        async def sink(reading: MeterReading) -> None:
            readings[reading.meter_id].append(reading)

        poller = ModbusPoller(targets, sink, clock=clock)
        await poller.start()
        try:
            await asyncio.sleep(1.5)
        finally:
            await poller.stop()
            for gateway in gateways:
                await gateway.stop()
        return readings

    readings = asyncio.run(scenario())
    maps = {m.id: m for m in load_shipped_maps()}
    assert len(readings) == 2 * len(maps)
    for meter_id, meter_readings in readings.items():
        rmap = maps[meter_id.rsplit("-", 1)[0]]
        validator = MeterValidator(meter_id, limits_from_map(rmap))
        assert len(meter_readings) >= 3, meter_id
        for reading in meter_readings:
            validated = validator.validate(reading)
            assert validated is not None
            flagged = {n: v for n, v in validated.values.items() if not v.ok}
            assert not flagged, (meter_id, flagged)
        counters = [r.value("energy_import_wh") or 0 for r in meter_readings]
        assert counters == sorted(counters) and counters[0] > 0, meter_id
