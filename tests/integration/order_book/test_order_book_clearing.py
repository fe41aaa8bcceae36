"""Gate closure on the simulated service clock, the clearing request through the outbox, and results turned into fills.

The order book runs with 60 s intervals, gate closure 20 s before the start,
and a clock 30 times faster than the wall: an interval closes every 2 s. A
toy clearing (see order_book_harness) publishes results the way the matcher will.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import grpc
import pytest
from conftest import OrderBookFactory
from order_book_harness import (
    OrderBookProcess,
    auth,
    clearing_requests,
    details,
    order,
    publish_raw,
    publish_results,
    read_stream,
    register,
    stub,
    toy_clear,
    wait_for_request,
)

from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2_grpc as pb_grpc
from services.order_book.client import BotKey, OrderBookClient
from services.order_book.domain.orders import Side
from services.platform.nats_server import NatsServer
from services.platform.subjects import CLEARING_RESULT, keyed

SPEEDUP = 30.0


def next_interval_with_margin(process: OrderBookProcess, margin_wall_s: float = 1.2) -> int:
    """The first open interval whose gate is at least `margin_wall_s` of wall time away."""
    start_s = process.first_open_s()
    while process.wall_until_s(start_s - process.gate_closure_s) < margin_wall_s:
        start_s += process.interval_s
    return start_s


def wait_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached in time")


def state(book: pb_grpc.OrderBookStub, key: BotKey, order_id: str) -> int:
    return int(book.GetOrder(pb.GetOrderRequest(order_id=order_id), metadata=auth(key), timeout=10).state)


def test_a_retry_after_gate_closure_returns_the_first_receipt_and_a_new_order_is_refused(
    order_book_factory: OrderBookFactory, sqlite_url: str, nats_server: NatsServer
) -> None:
    process = order_book_factory(sqlite_url, speedup=SPEEDUP)
    _channel, book = stub(process.target)
    buyer = BotKey.generate()
    register(book, buyer, "n1")
    start_s = next_interval_with_margin(process, 1.5)
    placed = order(buyer, start_s, client_order_id="b-retried")
    first = book.PlaceOrder(placed, metadata=auth(buyer))
    wait_for_request(nats_server.url, start_s)
    # A client whose answer was lost retries after the gate: it gets the receipt it missed.
    again = book.PlaceOrder(placed, metadata=auth(buyer))
    assert (again.order_id, again.book_seq) == (first.order_id, first.book_seq)
    with pytest.raises(grpc.RpcError) as refused:
        book.PlaceOrder(order(buyer, start_s, client_order_id="b-too-late"), metadata=auth(buyer))
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "interval_start_s" in details(refused.value)


def test_gate_closure_freezes_the_interval_and_sends_one_clearing_request_of_its_live_orders(
    order_book_factory: OrderBookFactory, sqlite_url: str, nats_server: NatsServer
) -> None:
    process = order_book_factory(sqlite_url, speedup=SPEEDUP)
    channel, book = stub(process.target)
    seller, buyer = BotKey.generate(), BotKey.generate()
    register(book, seller, "n0")
    register(book, buyer, "n1")
    start_s = next_interval_with_margin(process, 1.5)
    sell = book.PlaceOrder(
        order(
            seller, start_s, side=Side.SELL, node_id="n0", price_micro_per_kwh=80_000, client_order_id="s1"
        ),
        metadata=auth(seller),
    )
    gone = book.PlaceOrder(order(buyer, start_s, client_order_id="b-cancel"), metadata=auth(buyer))
    book.CancelOrder(pb.CancelOrderRequest(order_id=gone.order_id), metadata=auth(buyer))
    old = book.PlaceOrder(order(buyer, start_s, client_order_id="b-old"), metadata=auth(buyer))
    new = book.AmendOrder(
        pb.AmendOrderRequest(
            order_id=old.order_id, replacement=order(buyer, start_s, energy_wh=600, client_order_id="b-new")
        ),
        metadata=auth(buyer),
    )
    # Three intervals on, so that its own gate is still open when the test looks (6 s of wall time).
    later_start_s = start_s + 3 * process.interval_s
    later = book.PlaceOrder(order(buyer, later_start_s, client_order_id="b-later"), metadata=auth(buyer))

    request = wait_for_request(nats_server.url, start_s)
    assert request.interval.start_s == start_s and request.interval.length_s == process.interval_s
    assert {o.order_id for o in request.orders} == {sell.order_id, new.order_id}
    # S is the book's last sequence at the freeze; T's orders are those live with book_seq <= S.
    assert request.book_seq_max == later.book_seq
    assert [o.book_seq for o in request.orders] == sorted(o.book_seq for o in request.orders)
    by_id = {o.order_id: o for o in request.orders}
    assert (by_id[new.order_id].energy_wh, by_id[new.order_id].participant_id) == (600, buyer.participant_id)
    assert by_id[sell.order_id].side == common_pb2.SIDE_SELL and by_id[sell.order_id].node_id == "n0"
    ids = [msg_id for msg_id, r in clearing_requests(nats_server.url) if r.interval.start_s == start_s]
    assert ids == [f"clearing-request-{start_s}"]

    assert state(book, buyer, new.order_id) == pb.ORDER_STATE_FROZEN
    assert state(book, buyer, later.order_id) == pb.ORDER_STATE_LIVE
    metrics = process.metrics()
    assert f'p2pgrid_orders_live{{interval="{later_start_s}"}} 1.0' in metrics
    assert f'p2pgrid_orders_live{{interval="{start_s}"}}' not in metrics
    for call in (
        lambda: book.PlaceOrder(order(buyer, start_s, client_order_id="too-late"), metadata=auth(buyer)),
        lambda: book.CancelOrder(pb.CancelOrderRequest(order_id=new.order_id), metadata=auth(buyer)),
        lambda: book.AmendOrder(
            pb.AmendOrderRequest(
                order_id=new.order_id,
                replacement=order(buyer, start_s + 3 * process.interval_s, client_order_id="x"),
            ),
            metadata=auth(buyer),
        ),
    ):
        with pytest.raises(grpc.RpcError) as info:
            call()
        assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert str(start_s) in details(info.value) and str(start_s - process.gate_closure_s) in details(
            info.value
        )
    channel.close()


@pytest.mark.slow
def test_clearing_results_become_fills_streamed_to_their_owners_exactly_once(
    order_book_factory: OrderBookFactory, sqlite_url: str, nats_server: NatsServer
) -> None:
    process = order_book_factory(sqlite_url, speedup=SPEEDUP)
    channel, book = stub(process.target)
    seller, buyer = BotKey.generate(), BotKey.generate()
    register(book, seller, "n0")
    register(book, buyer, "n1")
    start_s = next_interval_with_margin(process)
    sells = [
        book.PlaceOrder(
            order(
                seller,
                start_s,
                side=Side.SELL,
                node_id="n0",
                energy_wh=1000,
                price_micro_per_kwh=p,
                client_order_id=f"s{p}",
            ),
            metadata=auth(seller),
        )
        for p in (60_000, 90_000, 150_000)
    ]
    buy = book.PlaceOrder(
        order(buyer, start_s, energy_wh=1500, price_micro_per_kwh=120_000, client_order_id="b"),
        metadata=auth(buyer),
    )
    request = wait_for_request(nats_server.url, start_s)
    result = toy_clear(request)
    # The toy clearing fills 1000 Wh at 60_000 and 500 Wh at 90_000; the last pair sets the price.
    assert {a.order_id: a.accepted_wh for a in result.result.orders} == {
        sells[0].order_id: 1000,
        sells[1].order_id: 500,
        sells[2].order_id: 0,
        buy.order_id: 1500,
    }
    price = result.result.nodes[0].price_micro_per_kwh
    publish_results(nats_server.url, [result])

    seller_fills = read_stream(
        book.StreamFills(pb.StreamFillsRequest(), metadata=auth(seller), timeout=20), count=3, timeout_s=20
    )
    assert [(f.order_id, f.accepted_wh, f.price_micro_per_kwh) for f in seller_fills] == [
        (sells[0].order_id, 1000, price),
        (sells[1].order_id, 500, price),
        (sells[2].order_id, 0, price),
    ]
    buyer_fills = read_stream(
        book.StreamFills(pb.StreamFillsRequest(), metadata=auth(buyer), timeout=5), count=1, timeout_s=5
    )
    assert [(f.order_id, f.accepted_wh, f.client_order_id, f.energy_wh) for f in buyer_fills] == [
        (buy.order_id, 1500, "b", 1500)
    ]
    filled = book.GetOrder(pb.GetOrderRequest(order_id=buy.order_id), metadata=auth(buyer))
    assert (filled.state, filled.accepted_wh, filled.fill_price_micro_per_kwh) == (
        pb.ORDER_STATE_FILLED,
        1500,
        price,
    )

    # Resuming after the first fill skips it.
    resumed = read_stream(
        book.StreamFills(
            pb.StreamFillsRequest(after_fill_seq=seller_fills[0].fill_seq), metadata=auth(seller), timeout=3
        ),
        count=2,
        timeout_s=3,
    )
    assert [f.order_id for f in resumed] == [sells[1].order_id, sells[2].order_id]

    # The same event again (redelivery) and a second result for the interval change nothing.
    other = events_pb2.ClearingResultEvent()
    other.CopyFrom(result)
    other.header.event_id = f"clearing-result-{start_s}-second"
    for allocation in other.result.orders:
        allocation.accepted_wh = 0
    publish_results(nats_server.url, [result, other])
    time.sleep(1.0)
    again = read_stream(
        book.StreamFills(pb.StreamFillsRequest(), metadata=auth(seller), timeout=3), count=10, timeout_s=3
    )
    assert [(f.order_id, f.accepted_wh) for f in again] == [(f.order_id, f.accepted_wh) for f in seller_fills]

    metrics = process.metrics()
    for line in (
        'p2pgrid_orders_accepted_total{side="sell"} 3.0',
        'p2pgrid_orders_accepted_total{side="buy"} 1.0',
        "p2pgrid_fills_total 4.0",
    ):
        assert line in metrics, line
    assert "p2pgrid_gate_closures_total" in metrics
    # The interval closed: it has no live-orders series any more.
    assert f'p2pgrid_orders_live{{interval="{start_s}"}}' not in metrics

    market = read_stream(
        book.StreamMarketData(pb.StreamMarketDataRequest(), metadata=auth(buyer), timeout=3),
        count=500,
        timeout_s=2,
    )
    cleared = [m.interval_cleared for m in market if m.WhichOneof("event") == "interval_cleared"]
    assert [
        (c.interval_start_s, c.volume_wh, {n.node_id: n.price_micro_per_kwh for n in c.nodes}["n1"])
        for c in cleared
    ] == [(start_s, 1500, price)]
    closed = [m.interval_closed for m in market if m.WhichOneof("event") == "interval_closed"]
    assert (start_s, 4) in {(c.interval_start_s, c.orders) for c in closed}
    opened = [
        m.interval_opened.interval_start_s for m in market if m.WhichOneof("event") == "interval_opened"
    ]
    assert opened == sorted(opened) and len(opened) >= 96 and opened[0] > start_s
    channel.close()


def test_unreadable_results_and_results_for_another_order_set_are_refused_and_the_right_one_still_applies(
    order_book_factory: OrderBookFactory, sqlite_url: str, nats_server: NatsServer
) -> None:
    process = order_book_factory(sqlite_url, speedup=SPEEDUP)
    channel, book = stub(process.target)
    key = BotKey.generate()
    register(book, key, "n1")
    start_s = next_interval_with_margin(process)
    receipt = book.PlaceOrder(order(key, start_s, client_order_id="o"), metadata=auth(key))
    request = wait_for_request(nats_server.url, start_s)
    wrong = toy_clear(request)
    wrong.result.book_seq_max += 1
    wrong.header.event_id = f"wrong-{start_s}"
    publish_raw(
        nats_server.url, keyed(CLEARING_RESULT, start_s), b"\xff not a protobuf", f"garbage-{start_s}"
    )
    publish_results(nats_server.url, [wrong])
    time.sleep(1.0)
    assert state(book, key, receipt.order_id) == pb.ORDER_STATE_FROZEN
    publish_results(nats_server.url, [toy_clear(request)])
    wait_until(lambda: state(book, key, receipt.order_id) == pb.ORDER_STATE_FILLED)
    channel.close()


@pytest.mark.slow
@pytest.mark.postgres
def test_after_a_stop_the_order_book_freezes_every_interval_whose_gate_passed_meanwhile(
    order_book_factory: OrderBookFactory, postgres_url: str, nats_server: NatsServer
) -> None:
    process = order_book_factory(postgres_url, speedup=SPEEDUP)
    channel, book = stub(process.target)
    key = BotKey.generate()
    register(book, key, "n1")
    first_s = next_interval_with_margin(process, 1.5)
    starts = [first_s + i * process.interval_s for i in range(2)]
    placed = {
        s: book.PlaceOrder(order(key, s, client_order_id=f"o{s}"), metadata=auth(key)).order_id
        for s in starts
    }
    assert process.stop() == 0
    # Down for the gate closures of both intervals.
    time.sleep(process.wall_until_s(starts[-1] - process.gate_closure_s) + 0.5)
    process.start()
    for start_s in starts:
        request = wait_for_request(nats_server.url, start_s)
        assert [o.order_id for o in request.orders] == [placed[start_s]]
    per_interval = [r.interval.start_s for _id, r in clearing_requests(nats_server.url)]
    assert all(per_interval.count(s) == 1 for s in starts)
    assert per_interval == sorted(per_interval)
    channel.close()


@pytest.mark.slow
def test_the_client_fill_stream_resumes_across_a_restart_of_the_order_book(
    order_book_factory: OrderBookFactory, sqlite_url: str, nats_server: NatsServer
) -> None:
    process = order_book_factory(sqlite_url, speedup=SPEEDUP)
    key = BotKey.generate()

    async def scenario() -> list[tuple[int, int]]:
        async with OrderBookClient(process.target, key, retry_for_s=30) as client:
            await client.register("n1")
            starts = [next_interval_with_margin(process) + i * process.interval_s for i in range(2)]
            for start_s in starts:
                await client.place(client.order(Side.BUY, "n1", start_s, 100, 100_000, f"f{start_s}"))
            stop = asyncio.Event()
            got: list[tuple[int, int]] = []

            async def follow() -> None:
                async for fill in client.fills(stop=stop):
                    got.append((fill.fill_seq, fill.interval_start_s))
                    if len(got) == 2:
                        stop.set()

            follower = asyncio.ensure_future(follow())
            for index, start_s in enumerate(starts):
                request = await asyncio.to_thread(wait_for_request, nats_server.url, start_s)
                await asyncio.to_thread(publish_results, nats_server.url, [toy_clear(request)])
                if index == 0:
                    while not got:
                        await asyncio.sleep(0.05)
                    await asyncio.to_thread(process.kill)
                    await asyncio.to_thread(process.start)
            await asyncio.wait_for(follower, timeout=30)
            return got

    got = asyncio.run(scenario())
    assert [interval for _seq, interval in got] == sorted({interval for _seq, interval in got})
    assert len(got) == 2 and got[0][0] < got[1][0]
