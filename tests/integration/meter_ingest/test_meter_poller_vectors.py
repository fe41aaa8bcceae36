"""Every shipped map, read through the real poller from a real pymodbus server, gives its vectors' values.

One simulated gateway per map serves each test vector on its own unit id,
over Modbus TCP and over RTU over TCP; the poller discovers SunSpec models,
reads configuration registers, packs its reads and decodes.
"""

from __future__ import annotations

import asyncio

import pytest

from services.meter_ingest.adapters.modbus_poller import GatewayTarget, MeterTarget, ModbusPoller
from services.meter_ingest.domain.readings import MeterReading
from services.meter_ingest.maps import load_shipped_maps
from services.meter_ingest.simulator import Gateway, vector_meters


async def _discard(_reading: MeterReading) -> None:
    return None


@pytest.mark.parametrize("framer", ["socket", "rtu"])
def test_the_poller_reads_every_maps_test_vectors_from_a_modbus_server(framer: str) -> None:
    async def scenario() -> list[str]:
        gateways: list[Gateway] = []
        targets: list[GatewayTarget] = []
        expectations = []
        try:
            for rmap in load_shipped_maps():
                meters = vector_meters(rmap)
                gateway = Gateway(meters, framer=framer, fill_gaps=True)
                port = await gateway.start()
                gateways.append(gateway)
                meter_targets = []
                for meter, vector in zip(meters, rmap.test_vectors, strict=True):
                    meter_id = f"{rmap.id}/{meter.unit_id}"
                    meter_targets.append(MeterTarget(meter_id, rmap, unit_id=meter.unit_id))
                    expectations.append((meter_id, vector))
                targets.append(
                    GatewayTarget("127.0.0.1", port, tuple(meter_targets), framer=framer, timeout_s=1.0)  # type: ignore[arg-type]
                )
            poller = ModbusPoller(targets, _discard)
            problems: list[str] = []
            try:
                readings = await asyncio.gather(*(poller.poll_once(meter_id) for meter_id, _ in expectations))
            finally:
                await poller.close()
            for (meter_id, vector), reading in zip(expectations, readings, strict=True):
                for name, expected in vector.expect.items():
                    got = reading.values[name]
                    if (
                        not got.ok
                        or got.value != pytest.approx(expected, rel=1e-9)
                        or type(got.value) is not type(expected)
                    ):
                        problems.append(f"{meter_id} {vector.name}: {name} = {got}, expected {expected!r}")
                for name, quality in vector.expect_invalid.items():
                    got = reading.values[name]
                    if got.quality is not quality or got.value is not None:
                        problems.append(f"{meter_id} {vector.name}: {name} = {got}, expected {quality.value}")
            return problems
        finally:
            for gateway in gateways:
                await gateway.stop()

    assert asyncio.run(scenario()) == []
