"""The meter_ingest service polls simulated meters, publishes their readings, and each interval's energy exactly once.

Three simulated household meters (PV and load on a simulated clock running
10x, one-minute intervals) sit behind one Modbus TCP gateway. The service runs
as a real process against a real nats-server; it is killed with SIGKILL
during an interval and started again. Every meter's energy for the
interval before, the interval of the kill and the one after must be on the
stream exactly once, equal to the straight-line interpolation of the
published readings at the boundaries, and close to what the simulated
household really drew and fed in (within what the reading spacing allows).
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
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
from services.platform.nats_server import NatsServer

SPEEDUP = 10.0
INTERVAL_S = 60
METERING_DELAY_S = 3
START_S = 1_750_075_200.0 - 25  # just before 12:00 UTC: PV exports and the load imports now and then
POLL_S = 0.1  # wall seconds: one simulated second between readings
# No simulated household draws or feeds in more than this.
MAX_POWER_W = 15_000
MS = 1000


def _meter_ids() -> list[str]:
    return ["m-1", "m-2", "m-3"]


@pytest.mark.slow
def test_polled_meters_yield_each_intervals_energy_once_across_a_kill_and_restart(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    clock = SimulatedClock(start_s=START_S, speedup=SPEEDUP, anchor_wall_s=time.time())
    gateway = SimulatedGateway("eastron_sdm630_v2", 3, clock)
    port = gateway.start()
    meters_path = write_meters_file(
        tmp_path / "meters.yaml",
        [
            {
                "meter_id": f"m-{unit}",
                "participant_id": f"p-owner-{unit}",
                "node_id": "n1",
                "map": "eastron_sdm630_v2",
                "modbus": {"host": "127.0.0.1", "port": port, "unit": unit, "poll_interval_s": POLL_S},
            }
            for unit in (1, 2, 3)
        ],
    )
    service = MeterIngestProcess(
        tmp_path,
        nats_server.url,
        [
            "--meters-path", str(meters_path), "--interval-s", str(INTERVAL_S),
            "--metering-delay-s", str(METERING_DELAY_S), "--checkpoint-interval-s", "0.5",
            *sim_args(clock),
        ],
    )  # fmt: skip
    try:
        service.start()

        def released_for_all() -> set[int]:
            found = energy_by_meter(nats_server.url)
            starts: dict[int, set[str]] = defaultdict(set)
            for meter_id, start_s in found:
                starts[start_s].add(meter_id)
            return {start_s for start_s, ids in starts.items() if ids == set(_meter_ids())}

        wait_for(lambda: bool(released_for_all()), 40, "the first interval energy", service.output)
        first = min(released_for_all())
        killed_interval = first + INTERVAL_S
        # Kill early in the interval after the first one released (its release is saved by then), so that the
        # restart is over well before the interval ends, also on a busy machine.
        while clock.now_s() < killed_interval + 8:
            time.sleep(0.05)
        service.kill()
        time.sleep(0.5)  # five simulated seconds without the service, then the time it takes to start
        service.start()
        last = killed_interval + INTERVAL_S
        wait_for(lambda: last in released_for_all(), 40, "the interval after the restart", service.output)
        assert service.metric("p2pgrid_meter_polls_total", outcome="ok") > 0
        assert service.metric("p2pgrid_interval_energy_published_total", flag="measured") >= 3
        assert service.stop() == 0, service.output()
    finally:
        service.ensure_dead()
        gateway.stop()

    readings = published_readings(nats_server.url)
    assert readings, "no readings were published"
    assert all(r.quality == pb.QUALITY_VALID for r in readings)
    # Only each meter's very first reading starts a counter epoch: the restart continued from the saved state.
    assert sorted((r.meter_id, list(r.flags)) for r in readings if r.flags) == [
        (meter_id, ["epoch_start"]) for meter_id in _meter_ids()
    ]
    points: dict[str, dict[str, list[tuple[int, int]]]] = defaultdict(lambda: defaultdict(list))
    for reading in sorted(readings, key=lambda r: r.time_ms):
        points[reading.meter_id]["import"].append((reading.time_ms, reading.energy_import_wh))
        points[reading.meter_id]["export"].append((reading.time_ms, reading.energy_export_wh))

    found = energy_by_meter(nats_server.url)
    profiles = {f"m-{m.unit_id}": m.profile for m in gateway.meters}
    for meter_id in _meter_ids():
        for start_s in (first, killed_interval, last):
            published = found.get((meter_id, start_s), [])
            assert len(published) == 1, f"{meter_id} interval {start_s}: published {len(published)} times"
            (energy,) = published
            assert energy.participant_id == meter_id.replace("m-", "p-owner-") and energy.node_id == "n1"
            assert energy.flag == events_pb2.ENERGY_FLAG_MEASURED
            true_import_wh, true_export_wh = profiles[meter_id].energy_wh(start_s, start_s + INTERVAL_S)
            for counter, published_wh, true_wh in (
                ("import", energy.import_wh, true_import_wh),
                ("export", energy.export_wh, true_export_wh),
            ):
                series = points[meter_id][counter]
                start_ms, end_ms = start_s * MS, (start_s + INTERVAL_S) * MS
                # Exactly the interpolation of the published readings at the two boundaries.
                assert published_wh == interpolate_wh(series, end_ms) - interpolate_wh(series, start_ms)
                # And what the household really did, within the straight-line error between readings.
                spans_s = (span_around_ms(series, start_ms) + span_around_ms(series, end_ms)) / MS
                tolerance_wh = MAX_POWER_W * spans_s / 3600 + 2
                assert abs(published_wh - true_wh) <= tolerance_wh, (meter_id, start_s, counter, true_wh)
    # Nothing else was published twice either.
    assert all(len(entries) == 1 for entries in found.values())
