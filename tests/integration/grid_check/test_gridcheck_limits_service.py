"""Line limits through the running service: only operators set them, they are stored, and the matcher gets them."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import grpc
import nacl.signing
import pytest
import yaml
from sqlalchemy import func, select

from services.domain.credentials import GRID_CHECK_AUDIENCE, b64url, make_token
from services.domain.ids import participant_id_from_public_key
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2 as pb
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2_grpc as pb_grpc
from services.grid_check.adapters.limit_store import limit_changes
from services.platform.db import make_engine
from services.platform.nats_bus import NatsBus
from services.platform.nats_server import NatsServer
from services.platform.subjects import GRID_LIMITS_REQUEST

INTERVAL_S = 900


def token_metadata(key: nacl.signing.SigningKey) -> tuple[tuple[str, str], ...]:
    now_s = int(time.time())
    return (("authorization", f"Bearer {make_token(key, GRID_CHECK_AUDIENCE, now_s - 5, now_s + 600)}"),)


def limits_of(reply: pb.Limits) -> dict[str, tuple[int, str]]:
    return {line.line_id: (line.capacity_w, line.reason) for line in reply.lines}


async def request_limits(url: str, interval_start_s: int) -> pb.Limits:
    """Ask over core NATS as the matcher does."""
    bus = await NatsBus.connect(url, name="test-matcher")
    try:
        request = events_pb2.LimitRequest(
            header=events_pb2.EventHeader(event_id=f"limits-{interval_start_s}", producer="test-matcher"),
            interval_start_s=interval_start_s,
        )
        return pb.Limits.FromString(await bus.request(GRID_LIMITS_REQUEST, request.SerializeToString()))
    finally:
        await bus.close()


def stored_rows(database_url: str) -> int:
    engine = make_engine(database_url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(limit_changes)).scalar_one())
    finally:
        engine.dispose()


def code_of(call: Any) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details() or ""


RATINGS = {"l1": (40_000, "rating"), "l2": (39_999, "rating"), "l3": (20_000, "rating")}


@pytest.mark.slow
def test_only_an_operator_sets_limits_and_they_reach_get_limits_the_matcher_and_a_restart(
    nats_server: NatsServer, start_grid_check: Any, database_url: str
) -> None:
    operator = nacl.signing.SigningKey.generate()
    participant = nacl.signing.SigningKey.generate()
    service = start_grid_check(database_url, operator_keys=b64url(bytes(operator.verify_key)))
    start_s = (int(time.time()) // INTERVAL_S + 8) * INTERVAL_S
    maintenance = pb.SetLimitsRequest(
        interval_start_s=start_s, lines=[pb.LineLimit(line_id="l2", capacity_w=30_000, reason="maintenance")]
    )

    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = pb_grpc.GridCheckStub(channel)
        code, details = code_of(
            lambda: stub.SetLimits(maintenance, metadata=token_metadata(participant), timeout=5)
        )
        assert code == grpc.StatusCode.PERMISSION_DENIED
        assert participant_id_from_public_key(bytes(participant.verify_key)) in details
        code, _ = code_of(lambda: stub.SetLimits(maintenance, timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        assert stored_rows(database_url) == 0
        assert limits_of(stub.GetLimits(pb.GetLimitsRequest(interval_start_s=start_s), timeout=5)) == RATINGS

        # Bad requests from an operator are refused precisely and store nothing either.
        closed_s = int(time.time()) // INTERVAL_S * INTERVAL_S
        code, details = code_of(
            lambda: stub.SetLimits(
                pb.SetLimitsRequest(interval_start_s=closed_s, lines=maintenance.lines),
                metadata=token_metadata(operator),
                timeout=5,
            )
        )
        assert code == grpc.StatusCode.FAILED_PRECONDITION
        assert "interval_start_s" in details
        code, details = code_of(
            lambda: stub.SetLimits(
                pb.SetLimitsRequest(
                    interval_start_s=start_s, lines=[pb.LineLimit(line_id="l9", capacity_w=1)]
                ),
                metadata=token_metadata(operator),
                timeout=5,
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("lines[0].line_id")
        assert stored_rows(database_url) == 0

        reply = stub.SetLimits(maintenance, metadata=token_metadata(operator), timeout=5)
        expected = {**RATINGS, "l2": (30_000, "maintenance")}
        assert reply.interval_start_s == start_s
        assert limits_of(reply) == expected
        assert limits_of(stub.GetLimits(pb.GetLimitsRequest(interval_start_s=start_s), timeout=5)) == expected
        # One interval only: the next one is back at the ratings.
        following = pb.GetLimitsRequest(interval_start_s=start_s + INTERVAL_S)
        assert limits_of(stub.GetLimits(following, timeout=5)) == RATINGS
        assert stored_rows(database_url) == 1

        # Schedules are checked against the interval's limits: 35 kW to n2 overloads l2 only while limited.
        schedule = [
            pb.NodeInjection(node_id="n0", injection_w=35_000),
            pb.NodeInjection(node_id="n2", injection_w=-35_000),
        ]
        limited = stub.CheckSchedule(
            pb.CheckScheduleRequest(interval_start_s=start_s, injections=schedule), timeout=5
        )
        assert [(v.line_id, v.capacity_w, v.flow_w) for v in limited.violations] == [("l2", 30_000, 35_000)]
        normal = stub.CheckSchedule(
            pb.CheckScheduleRequest(interval_start_s=start_s + INTERVAL_S, injections=schedule), timeout=5
        )
        assert list(normal.violations) == []

    matcher_view = asyncio.run(request_limits(nats_server.url, start_s))
    assert matcher_view.interval_start_s == start_s
    assert limits_of(matcher_view) == expected
    assert service.stop() == 0, service.log()

    restarted = start_grid_check(database_url, operator_keys=b64url(bytes(operator.verify_key)))
    with grpc.insecure_channel(restarted.grpc_target) as channel:
        stub = pb_grpc.GridCheckStub(channel)
        assert limits_of(stub.GetLimits(pb.GetLimitsRequest(interval_start_s=start_s), timeout=5)) == expected
    assert limits_of(asyncio.run(request_limits(nats_server.url, start_s))) == expected
    assert restarted.stop() == 0, restarted.log()


def test_get_network_returns_the_grid_and_bad_calls_get_precise_codes(
    start_grid_check: Any, service_grid: Any
) -> None:
    service = start_grid_check(public_reads="false")
    reader = nacl.signing.SigningKey.generate()
    with grpc.insecure_channel(service.grpc_target) as channel:
        stub = pb_grpc.GridCheckStub(channel)
        code, _ = code_of(lambda: stub.GetNetwork(pb.GetNetworkRequest(), timeout=5))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        network = stub.GetNetwork(pb.GetNetworkRequest(), metadata=token_metadata(reader), timeout=5)
        assert list(network.node_ids) == ["n0", "n1", "n2", "n3"]
        assert list(network.line_ids) == ["l1", "l2", "l3"]
        assert network.slack_node_id == "n0"
        assert yaml.safe_load(network.grid_yaml)["lines"] == yaml.safe_load(service_grid.read_text())["lines"]

        code, details = code_of(
            lambda: stub.GetLimits(
                pb.GetLimitsRequest(interval_start_s=901), metadata=token_metadata(reader), timeout=5
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert details.startswith("interval_start_s")
        code, details = code_of(
            lambda: stub.CheckSchedule(
                pb.CheckScheduleRequest(injections=[pb.NodeInjection(node_id="n2", injection_w=-5)]),
                metadata=token_metadata(reader),
                timeout=5,
            )
        )
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert "sum to" in details
        balanced = stub.CheckSchedule(
            pb.CheckScheduleRequest(
                injections=[pb.NodeInjection(node_id="n2", injection_w=-5)], slack_balances=True
            ),
            metadata=token_metadata(reader),
            timeout=5,
        )
        assert {i.node_id: i.injection_w for i in balanced.injections} == {
            "n0": 5,
            "n1": 0,
            "n2": -5,
            "n3": 0,
        }
    assert service.stop() == 0, service.log()
