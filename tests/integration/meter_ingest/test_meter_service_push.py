"""Pushed readings over gRPC: only the meters a key may push are taken, and their interval energy is exact.

The service runs as a real process (simulated clock, 30x, one-minute
intervals) with two push meters, each with its own key. One key pushes its
meter's readings for two intervals, with a reading for the other meter, a
duplicate, a malformed and an implausible reading mixed in; the summary, the
stream, the metrics and the interval energy must show exactly what was
accepted. Calls without a token, or with a key no meter lists, are refused.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from meter_service_harness import (
    MeterIngestProcess,
    PushKey,
    energy_by_meter,
    published_readings,
    sim_args,
    wait_for,
    write_meters_file,
)

from services.domain.intervals import SimulatedClock
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2 as pb
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2_grpc as pb_grpc
from services.platform.nats_server import NatsServer

SPEEDUP = 30.0
INTERVAL_S = 60
STEP_S = 10  # simulated seconds between one meter's readings
MS = 1000
# The simulated counters read 50,000 Wh and 20,000 Wh at this time (even, so halves stay whole at boundaries).
COUNTERS_ZERO_S = 1_700_000_000


def reading(meter_id: str, t_s: int, **fields: object) -> pb.Reading:
    """A valid reading whose counters grow 1 Wh (import) and 0.5 Wh (export) per simulated second."""
    elapsed_s = t_s - COUNTERS_ZERO_S
    values: dict[str, object] = {
        "meter_id": meter_id,
        "time_ms": t_s * MS,
        "energy_import_wh": 50_000 + elapsed_s,
        "energy_export_wh": 20_000 + elapsed_s // 2,
        "power_w": 3_600,
        "quality": pb.QUALITY_VALID,
    }
    values.update(fields)
    return pb.Reading(**values)  # type: ignore[arg-type]


@pytest.mark.slow
def test_pushed_readings_are_taken_only_for_the_callers_meters_and_give_exact_interval_energy(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    key_a, key_b, stranger = PushKey.new(), PushKey.new(), PushKey.new()
    now_s = time.time()
    first_boundary_s = int(now_s) - int(now_s) % INTERVAL_S + 2 * INTERVAL_S
    # The simulated clock reaches the first boundary a few wall seconds after the service starts.
    clock = SimulatedClock(start_s=first_boundary_s - 60, speedup=SPEEDUP, anchor_wall_s=time.time() + 2)
    meters_path = write_meters_file(
        tmp_path / "meters.yaml",
        [
            {
                "meter_id": meter_id,
                "participant_id": f"owner-{meter_id}",
                "node_id": "n2",
                "map": "eastron_sdm120",
                "push": {"public_keys": [key.public]},
            }
            for meter_id, key in (("m-a", key_a), ("m-b", key_b))
        ],
    )
    service = MeterIngestProcess(
        tmp_path,
        nats_server.url,
        [
            "--meters-path", str(meters_path), "--interval-s", str(INTERVAL_S), "--metering-delay-s", "2",
            # Ten wall seconds at 30x: a busy machine must not turn a late message into a skewed clock.
            "--max-clock-skew-s", "300", *sim_args(clock),
        ],
    )  # fmt: skip
    try:
        ports = service.start()
        channel = grpc.insecure_channel(f"127.0.0.1:{ports['grpc_port']}")
        stub = pb_grpc.MeterIngestStub(channel)
        one = pb.ReadingBatch(readings=[reading("m-a", first_boundary_s - 20)])

        for metadata in ((), stranger.metadata()):
            with pytest.raises(grpc.RpcError) as refused:
                stub.PushReadings(iter([one]), metadata=metadata, timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value.details()

        times = list(range(first_boundary_s - STEP_S, first_boundary_s + 2 * INTERVAL_S + 1, STEP_S))
        odd_one = first_boundary_s + 35

        def paced() -> Iterator[pb.ReadingBatch]:
            """Each reading when the simulated clock reaches its time, as a meter would send it."""
            for t_s in times:
                while clock.now_s() < t_s:
                    time.sleep(0.01)
                batch = [reading("m-a", t_s)]
                if t_s == first_boundary_s:
                    batch += [
                        reading("m-b", t_s),  # not key A's meter
                        reading("m-a", t_s),  # the same reading again
                        reading("m-a", t_s + 1, quality=pb.QUALITY_UNSPECIFIED),
                    ]
                if t_s == odd_one - 5:
                    while clock.now_s() < odd_one:
                        time.sleep(0.01)
                    batch.append(reading("m-a", odd_one, power_w=900_000))  # beyond the map's range
                yield pb.ReadingBatch(readings=batch)

        summary = stub.PushReadings(paced(), metadata=key_a.metadata(), timeout=60)
        assert summary.accepted == len(times) + 1
        assert summary.rejected == 3
        assert any("'m-b' may not be pushed" in error for error in summary.errors), summary.errors
        assert any("duplicate" in error for error in summary.errors), summary.errors
        assert any("quality" in error for error in summary.errors), summary.errors

        # Key B may push its own meter.
        own = stub.PushReadings(
            iter([pb.ReadingBatch(readings=[reading("m-b", int(clock.now_s()))])]),
            metadata=key_b.metadata(),
            timeout=10,
        )
        assert (own.accepted, own.rejected) == (1, 0)

        last_start_s = first_boundary_s + INTERVAL_S
        wait_for(
            lambda: ("m-a", last_start_s) in energy_by_meter(nats_server.url),
            30,
            "the second interval's energy",
            service.output,
        )
        assert service.metric("p2pgrid_meter_invalid_total", meter="m-b", reason="not_permitted") == 1
        assert service.metric("p2pgrid_meter_invalid_total", meter="m-a", reason="out_of_range") == 1
        assert service.metric("p2pgrid_meter_readings_total", source="push", quality="rejected") == 2
        assert service.metric("p2pgrid_meter_readings_total", source="push", quality="duplicate") == 1
        assert service.stop() == 0, service.output()
        channel.close()
    finally:
        service.ensure_dead()

    published = published_readings(nats_server.url)
    by_meter = sorted((r.meter_id, r.time_ms // MS) for r in published)
    assert by_meter == sorted(
        [("m-a", t) for t in [*times, odd_one]] + [("m-b", published[-1].time_ms // MS)]
    )
    flagged = {
        r.time_ms // MS: (r.quality, list(r.flags)) for r in published if r.meter_id == "m-a" and r.flags
    }
    assert flagged == {
        times[0]: (pb.QUALITY_VALID, ["epoch_start"]),
        odd_one: (pb.QUALITY_INVALID, ["power_w:out_of_range"]),
    }

    energies = energy_by_meter(nats_server.url)
    for start_s in (first_boundary_s, last_start_s):
        (energy,) = energies[("m-a", start_s)]
        assert (energy.import_wh, energy.export_wh) == (60, 30)
        assert energy.flag == events_pb2.ENERGY_FLAG_MEASURED
        assert (energy.participant_id, energy.node_id) == ("owner-m-a", "n2")
