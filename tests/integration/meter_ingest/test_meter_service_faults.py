"""Faulty readings reach the stream flagged invalid, never as valid, and cost the interval energy nothing.

Two simulated household meters behind one gateway (simulated clock at 10x,
one-minute intervals); in the middle of an interval one of them returns NaN,
then counters that read 0, then counters that jump to garbage, and the other
answers a Modbus exception. The service runs as a real process.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import pytest
from meter_service_harness import (
    MeterIngestProcess,
    SimulatedGateway,
    energy_by_meter,
    interpolate_wh,
    published_readings,
    sim_args,
    span_around_ms,
    wait_for,
    write_meters_file,
)

from services.domain.intervals import SimulatedClock
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
from services.meter_ingest.simulator import FaultKind
from services.platform.nats_server import NatsServer

SPEEDUP = 10.0
INTERVAL_S = 60
START_S = 1_750_075_200.0 - 25
POLL_S = 0.1
MAX_POWER_W = 15_000
MS = 1000
COUNTERS = ("energy_import_wh", "energy_export_wh")


@pytest.mark.slow
def test_faulty_readings_are_published_flagged_and_the_interval_energy_stays_right(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = SimulatedClock(start_s=START_S, speedup=SPEEDUP, anchor_wall_s=time.time())
    gateway = SimulatedGateway("eastron_sdm630_v2", 2, clock, seed=3)
    port = gateway.start()
    meters_path = write_meters_file(
        tmp_path / "meters.yaml",
        [
            {
                "meter_id": f"m-{unit}",
                "participant_id": f"p-{unit}",
                "node_id": "n1",
                "map": "eastron_sdm630_v2",
                "modbus": {"host": "127.0.0.1", "port": port, "unit": unit, "poll_interval_s": POLL_S},
            }
            for unit in (1, 2)
        ],
    )
    service = MeterIngestProcess(
        tmp_path,
        nats_server.url,
        [
            "--meters-path",
            str(meters_path),
            "--interval-s",
            str(INTERVAL_S),
            "--metering-delay-s",
            "3",
            *sim_args(clock),
        ],
    )
    faulty, other = gateway.gateway.meter(2), gateway.gateway.meter(1)
    try:
        service.start()
        wait_for(
            lambda: bool(energy_by_meter(nats_server.url)), 40, "the first interval energy", service.output
        )
        first = min(start_s for _meter, start_s in energy_by_meter(nats_server.url))
        faulted = first + INTERVAL_S
        while clock.now_s() < faulted + 15:
            time.sleep(0.05)
        for kind in (FaultKind.NAN, FaultKind.BACKWARDS, FaultKind.JUMP):
            gateway.run(lambda kind=kind: faulty.inject(kind, 3))  # type: ignore[misc]
            time.sleep(0.6)
        gateway.run(lambda: other.inject(FaultKind.EXCEPTION_4, 2))
        wait_for(
            lambda: {("m-1", faulted), ("m-2", faulted)} <= set(energy_by_meter(nats_server.url)),
            30,
            "the faulted interval's energy",
            service.output,
        )
        for reason in ("nan", "counter_backwards", "counter_jump"):
            assert service.metric("p2pgrid_meter_invalid_total", meter="m-2", reason=reason) >= 1, reason
        assert service.metric("p2pgrid_meter_polls_total", outcome="exception") >= 1
        assert service.stop() == 0, service.output()
    finally:
        service.ensure_dead()
        gateway.stop()

    readings = sorted(published_readings(nats_server.url), key=lambda r: r.time_ms)
    seen_flags: set[str] = set()
    valid: dict[str, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for reading in readings:
        value_flags = [flag for flag in reading.flags if ":" in flag]
        seen_flags.update(f"{reading.meter_id} {flag}" for flag in value_flags)
        # A reading with any unusable value is never published as valid.
        assert (reading.quality == pb.QUALITY_INVALID) == bool(value_flags), (reading.meter_id, reading.flags)
        if reading.quality != pb.QUALITY_VALID:
            continue
        for counter in COUNTERS:
            series = valid[reading.meter_id][counter]
            value = getattr(reading, counter)
            # Valid counters never step back and never take the garbage values.
            assert not series or value >= series[-1][1], (reading.meter_id, counter, value, series[-1])
            assert value < 1_000_000_000
            series.append((reading.time_ms, value))
    for expected in (
        "m-2 energy_import_wh:nan",
        "m-2 power_w:nan",
        "m-2 energy_import_wh:counter_backwards",
        "m-2 energy_export_wh:counter_jump",
        "m-1 power_w:exception",
    ):
        assert expected in seen_flags, sorted(seen_flags)

    energies = energy_by_meter(nats_server.url)
    profiles = {f"m-{m.unit_id}": m.profile for m in gateway.meters}
    for meter_id in ("m-1", "m-2"):
        (energy,) = energies[(meter_id, faulted)]
        true_wh = dict(
            zip(COUNTERS, profiles[meter_id].energy_wh(faulted, faulted + INTERVAL_S), strict=True)
        )
        for counter, published_wh in zip(COUNTERS, (energy.import_wh, energy.export_wh), strict=True):
            series = valid[meter_id][counter]
            start_ms, end_ms = faulted * MS, (faulted + INTERVAL_S) * MS
            assert published_wh == interpolate_wh(series, end_ms) - interpolate_wh(series, start_ms)
            spans_s = (span_around_ms(series, start_ms) + span_around_ms(series, end_ms)) / MS
            assert abs(published_wh - true_wh[counter]) <= MAX_POWER_W * spans_s / 3600 + 2, (
                meter_id,
                counter,
            )
