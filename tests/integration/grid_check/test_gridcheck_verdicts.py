"""grid_check re-checks every clearing result published on a real nats-server and publishes its verdict."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.platform.nats_bus import NatsBus
from services.platform.nats_server import NatsServer
from services.platform.subjects import CLEARING_RESULT, GRID_VERDICT, keyed

INTERVAL_S = 900


def clearing_event(
    interval_start_s: int, seller_node_id: str, buyer_node_id: str, energy_wh: int, flows_w: dict[str, int]
) -> events_pb2.ClearingResultEvent:
    event_id = f"clearing-result-{interval_start_s}"
    return events_pb2.ClearingResultEvent(
        header=events_pb2.EventHeader(event_id=event_id, producer="test-matcher"),
        result=common_pb2.ClearingResult(
            interval=common_pb2.Interval(start_s=interval_start_s, length_s=INTERVAL_S),
            trades=[
                common_pb2.Trade(
                    buyer_order_id="b1",
                    seller_order_id="s1",
                    energy_wh=energy_wh,
                    seller_node_id=seller_node_id,
                    buyer_node_id=buyer_node_id,
                )
            ],
            lines=[
                common_pb2.LineFlow(line_id=line_id, flow_w=flow_w) for line_id, flow_w in flows_w.items()
            ],
        ),
    )


async def publish_and_collect(
    url: str, events: list[events_pb2.ClearingResultEvent], expected: int
) -> list[tuple[str, events_pb2.GridVerdict]]:
    bus = await NatsBus.connect(url, name="test")
    try:
        subscription: Any = await bus.js.subscribe(f"{GRID_VERDICT}.>", stream="GRID", ordered_consumer=True)
        for event in events:
            await bus.publish(
                keyed(CLEARING_RESULT, event.result.interval.start_s),
                event.SerializeToString(),
                event_id=event.header.event_id,
            )
        verdicts = []
        for _ in range(expected):
            msg = await subscription.next_msg(timeout=10)
            verdicts.append((msg.headers["Nats-Msg-Id"], events_pb2.GridVerdict.FromString(msg.data)))
        return verdicts
    finally:
        await bus.close()


@pytest.mark.slow
def test_a_result_overloading_a_line_by_1_w_fails_naming_the_line_and_a_feasible_one_passes(
    nats_server: NatsServer, start_grid_check: Any
) -> None:
    service = start_grid_check()
    start_s = (int(time.time()) // INTERVAL_S + 4) * INTERVAL_S
    # n0 -> n2: 10,000 Wh = 40,000 W over l1 (limit 40,000: at the limit, allowed) and l2 (limit 39,999).
    overloaded = clearing_event(start_s, "n0", "n2", 10_000, {"l1": 40_000, "l2": 40_000, "l3": 0})
    # n0 -> n1: the same energy stops before l2, so only l1 carries it, exactly at its limit.
    feasible = clearing_event(start_s + INTERVAL_S, "n0", "n1", 10_000, {"l1": 40_000, "l2": 0, "l3": 0})

    # A second, different result for an interval already judged is judged too, under its own id.
    rerun = clearing_event(start_s + INTERVAL_S, "n0", "n1", 5_000, {"l1": 20_000})
    rerun.header.event_id = f"clearing-result-{start_s + INTERVAL_S}-rerun"

    verdicts = asyncio.run(publish_and_collect(nats_server.url, [overloaded, feasible, rerun], expected=3))

    rerun_ids = [msg_id for msg_id, _verdict in verdicts[2:]]
    assert len(rerun_ids) == 1 and rerun_ids[0].startswith(f"grid-verdict-{start_s + INTERVAL_S}-")
    by_interval = {verdict.interval_start_s: (msg_id, verdict) for msg_id, verdict in verdicts[:2]}
    msg_id, failing = by_interval[start_s]
    assert msg_id == f"grid-verdict-{start_s}"
    assert failing.header.event_id == msg_id
    assert not failing.ok
    assert [(v.line_id, v.kind, v.flow_w, v.capacity_w) for v in failing.violations] == [
        ("l2", "overload", 40_000, 39_999)
    ]
    assert "line l2" in failing.violations[0].message
    assert "by 1.000 W" in failing.violations[0].message

    msg_id, passing = by_interval[start_s + INTERVAL_S]
    assert msg_id == f"grid-verdict-{start_s + INTERVAL_S}"
    assert passing.ok
    assert list(passing.violations) == []

    assert service.sample("p2pgrid_grid_verdicts_total", outcome="fail") == 1.0
    assert service.sample("p2pgrid_grid_verdicts_total", outcome="pass") == 2.0
    assert service.sample("p2pgrid_grid_violations_total", line="l2", source="clearing") == 1.0
    assert service.sample("p2pgrid_grid_violations_total", line="l1", source="clearing") is None
    assert service.stop() == 0, service.log()


@pytest.mark.slow
def test_a_restarted_service_judges_each_result_once(nats_server: NatsServer, start_grid_check: Any) -> None:
    start_s = (int(time.time()) // INTERVAL_S + 4) * INTERVAL_S
    first = start_grid_check()
    asyncio.run(
        publish_and_collect(
            nats_server.url, [clearing_event(start_s, "n0", "n2", 10_000, {"l2": 40_000})], expected=1
        )
    )
    assert first.stop() == 0, first.log()

    second = start_grid_check()
    later = clearing_event(start_s + INTERVAL_S, "n0", "n1", 1_000, {"l1": 4_000})
    verdicts = asyncio.run(publish_and_collect(nats_server.url, [later], expected=2))

    # The stream holds both verdicts, one per interval: the restart did not judge the first result again.
    assert sorted(verdict.interval_start_s for _msg_id, verdict in verdicts) == [
        start_s,
        start_s + INTERVAL_S,
    ]
    assert second.sample("p2pgrid_grid_verdicts_total", outcome="fail") is None
    assert second.sample("p2pgrid_grid_verdicts_total", outcome="pass") == 1.0
    assert second.stop() == 0, second.log()
