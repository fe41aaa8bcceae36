"""The live view: meter readings published on a real nats-server move the line loading on /metrics within 2 s."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import grpc
import pytest

from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2, grid_check_pb2_grpc
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2
from services.platform.nats_bus import NatsBus
from services.platform.nats_server import NatsServer
from services.platform.subjects import GRID_LOADING, METER_READINGS, keyed

DEADLINE_S = 2.0
L2_LIMIT_W = 39_999
L3_LIMIT_W = 20_000


def pct(flow_w: float, limit_w: int) -> float:
    return 100.0 * abs(flow_w) / limit_w


async def publish_readings(
    url: str,
    batch_no: int,
    readings: dict[str, int],
    quality: meter_ingest_pb2.Quality.ValueType = meter_ingest_pb2.QUALITY_VALID,
) -> None:
    """One ReadingsBatch of power per meter (positive importing), stamped now."""
    now_ms = int(time.time() * 1000)
    batch = events_pb2.ReadingsBatch(
        header=events_pb2.EventHeader(event_id=f"readings-{batch_no}-{now_ms}", producer="test-ingest"),
        readings=[
            meter_ingest_pb2.Reading(
                meter_id=meter_id,
                time_ms=now_ms,
                power_w=power_w,
                quality=quality,
            )
            for meter_id, power_w in readings.items()
        ],
    )
    bus = await NatsBus.connect(url, name="test-ingest")
    try:
        await bus.publish(
            keyed(METER_READINGS, "test"), batch.SerializeToString(), event_id=batch.header.event_id
        )
    finally:
        await bus.close()


def wait_for(read: Callable[[], float | None], expected: float, deadline_s: float) -> float:
    """Seconds until `read()` is within 0.001 of `expected`; fails after `deadline_s`."""
    started = time.monotonic()
    last = None
    while time.monotonic() - started < deadline_s:
        last = read()
        if last is not None and abs(last - expected) < 1e-3:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"expected {expected}, still {last} after {deadline_s} s")


async def latest_loading(url: str) -> events_pb2.LiveLoading:
    bus = await NatsBus.connect(url, name="test")
    try:
        info = await bus.js.get_last_msg("GRID", keyed(GRID_LOADING, "live"))
        assert info.data is not None
        return events_pb2.LiveLoading.FromString(info.data)
    finally:
        await bus.close()


@pytest.mark.slow
def test_the_loading_metric_of_a_line_follows_published_readings_within_2_s(
    nats_server: NatsServer, start_grid_check: Any
) -> None:
    service = start_grid_check()

    def l2_loading() -> float | None:
        value: float | None = service.sample("p2pgrid_line_loading_percent", line="l2")
        return value

    # The meter at n2 imports 10 kW: l2 carries 10 kW from n1 to n2.
    asyncio.run(publish_readings(nats_server.url, 1, {"m-n2": 10_000}))
    first_s = wait_for(l2_loading, pct(10_000, L2_LIMIT_W), DEADLINE_S)
    # It turns to exporting 20 kW: the flow reverses and the loading doubles.
    asyncio.run(publish_readings(nats_server.url, 2, {"m-n2": -20_000}))
    second_s = wait_for(l2_loading, pct(-20_000, L2_LIMIT_W), DEADLINE_S)
    assert first_s < DEADLINE_S and second_s < DEADLINE_S
    assert service.sample("p2pgrid_node_injection_w", node="n2") == 20_000.0
    # The slack takes the balance: n0 absorbs the export.
    assert service.sample("p2pgrid_node_injection_w", node="n0") == -20_000.0

    # An invalid reading and a meter missing from the meter map change nothing.
    asyncio.run(
        publish_readings(nats_server.url, 3, {"m-n2": 5_000}, quality=meter_ingest_pb2.QUALITY_INVALID)
    )
    asyncio.run(publish_readings(nats_server.url, 4, {"m-unknown": 30_000}))

    # The meter at n3 imports 25 kW over l3, rated 20 kW: a live violation.
    asyncio.run(publish_readings(nats_server.url, 5, {"m-n3": 25_000}))
    wait_for(
        lambda: service.sample("p2pgrid_line_loading_percent", line="l3"), pct(25_000, L3_LIMIT_W), DEADLINE_S
    )
    assert l2_loading() == pytest.approx(pct(-20_000, L2_LIMIT_W))
    assert service.sample("p2pgrid_grid_violations_total", line="l3", source="live") == 1.0

    with grpc.insecure_channel(service.grpc_target) as channel:
        state = grid_check_pb2_grpc.GridCheckStub(channel).GetLiveState(
            grid_check_pb2.GetLiveStateRequest(), timeout=5
        )
    assert state.fresh_meters == 2
    assert {i.node_id: i.injection_w for i in state.injections} == {
        "n0": -20_000 + 25_000,
        "n1": 0,
        "n2": 20_000,
        "n3": -25_000,
    }
    assert {line.line_id: line.flow_w for line in state.lines} == {"l1": 5_000, "l2": -20_000, "l3": 25_000}
    assert [(v.line_id, v.kind) for v in state.violations] == [("l3", "overload")]

    # What the operators' tools read from NATS: the latest LiveLoading event, with the overload in it.
    deadline = time.monotonic() + DEADLINE_S
    while True:
        loading = asyncio.run(latest_loading(nats_server.url))
        if loading.violations or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert {line.line_id: line.flow_w for line in loading.lines} == {"l1": 5_000, "l2": -20_000, "l3": 25_000}
    assert [v.line_id for v in loading.violations] == ["l3"]
    assert service.stop() == 0, service.log()
