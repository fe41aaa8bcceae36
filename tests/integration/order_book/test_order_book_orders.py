"""Order life cycle over real gRPC: idempotent client ids, gap-free book sequence, amend, cancel, listing, the client library."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from conftest import OrderBookFactory
from order_book_harness import OrderBookProcess, auth, details, order, order_events, register, stub
from sqlalchemy import Engine, func, select

from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2_grpc as pb_grpc
from services.order_book.adapters.store import orders_t
from services.order_book.client import BotKey, OrderBookClient, OrderBookError
from services.order_book.domain.orders import Side
from services.platform.db import make_engine
from services.platform.nats_server import NatsServer


@dataclass
class Market:
    book: pb_grpc.OrderBookStub
    process: OrderBookProcess
    engine: Engine
    open_s: int

    def participant(self, node_id: str = "n1") -> BotKey:
        key = BotKey.generate()
        register(self.book, key, node_id)
        return key

    def rows(self, key: BotKey) -> list[tuple[str, int, int]]:
        with self.engine.connect() as conn:
            return [
                (r.client_order_id, r.book_seq, r.state)
                for r in conn.execute(
                    select(orders_t.c.client_order_id, orders_t.c.book_seq, orders_t.c.state)
                    .where(orders_t.c.participant_id == key.participant_id)
                    .order_by(orders_t.c.book_seq)
                )
            ]


@pytest.fixture(scope="module")
def market(
    module_nats: NatsServer, module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Market]:
    process = OrderBookProcess(
        module_nats.url, module_database_url, Path(tmp_path_factory.mktemp("orders"))
    ).start()
    channel, book = stub(process.target)
    engine = make_engine(module_database_url)
    try:
        yield Market(book, process, engine, process.first_open_s() + 5 * process.interval_s)
    finally:
        engine.dispose()
        channel.close()
        process.stop()


def test_a_repeated_client_order_id_returns_the_first_receipt(market: Market) -> None:
    key = market.participant()
    request = order(key, market.open_s, client_order_id="repeat-1")
    first = market.book.PlaceOrder(request, metadata=auth(key), timeout=10)
    again = market.book.PlaceOrder(request, metadata=auth(key), timeout=10)
    in_batch = market.book.PlaceOrders(
        pb.PlaceOrdersRequest(orders=[request, request]), metadata=auth(key), timeout=10
    )
    assert again == first
    assert [r.receipt for r in in_batch.results] == [first, first]
    assert market.rows(key) == [("repeat-1", first.book_seq, pb.ORDER_STATE_LIVE)]


def test_a_repeated_client_order_id_with_a_different_body_is_already_exists(market: Market) -> None:
    key = market.participant()
    first = market.book.PlaceOrder(
        order(key, market.open_s, client_order_id="same"), metadata=auth(key), timeout=10
    )
    changed = order(key, market.open_s, energy_wh=999, client_order_id="same")
    with pytest.raises(grpc.RpcError) as info:
        market.book.PlaceOrder(changed, metadata=auth(key), timeout=10)
    assert info.value.code() == grpc.StatusCode.ALREADY_EXISTS
    assert details(info.value).startswith("body.client_order_id: ")
    assert first.order_id in details(info.value)
    both = market.book.PlaceOrders(
        pb.PlaceOrdersRequest(orders=[order(key, market.open_s, client_order_id="fresh"), changed]),
        metadata=auth(key),
        timeout=10,
    )
    assert both.results[0].HasField("receipt")
    assert (both.results[1].error.code, both.results[1].error.field) == (
        "ALREADY_EXISTS",
        "orders[1].body.client_order_id",
    )
    assert [row[0] for row in market.rows(key)] == ["same", "fresh"]


def test_different_participants_may_use_the_same_client_order_id(market: Market) -> None:
    a, b = market.participant("n1"), market.participant("n2")
    ra = market.book.PlaceOrder(
        order(a, market.open_s, client_order_id="shared"), metadata=auth(a), timeout=10
    )
    rb = market.book.PlaceOrder(
        order(b, market.open_s, node_id="n2", client_order_id="shared"), metadata=auth(b), timeout=10
    )
    assert ra.order_id != rb.order_id


def test_the_book_sequence_has_no_gaps_across_rejections_and_repeats(market: Market) -> None:
    key = market.participant()
    good = [order(key, market.open_s, client_order_id=f"gap-{i}") for i in range(5)]
    bad = order(key, market.open_s, client_order_id="gap-bad")
    bad.signature = bytes(64)
    conflicting = order(key, market.open_s, energy_wh=7, client_order_id="gap-0")
    response = market.book.PlaceOrders(
        pb.PlaceOrdersRequest(
            orders=[good[0], bad, good[1], conflicting, good[0], good[2], good[3], good[4]]
        ),
        metadata=auth(key),
        timeout=10,
    )
    seqs = [r.receipt.book_seq for r in response.results if r.HasField("receipt")]
    assert [r.WhichOneof("outcome") for r in response.results] == [
        "receipt",
        "error",
        "receipt",
        "error",
        "receipt",
        "receipt",
        "receipt",
        "receipt",
    ]
    distinct = sorted(set(seqs))
    assert distinct == list(range(distinct[0], distinct[0] + 5))
    with market.engine.connect() as conn:
        count, low, high = conn.execute(
            select(func.count(), func.min(orders_t.c.book_seq), func.max(orders_t.c.book_seq))
        ).one()
    assert (low, high) == (1, count)


def test_amend_cancels_and_replaces_atomically_and_a_repeat_returns_the_same_receipt(market: Market) -> None:
    key = market.participant()
    original = market.book.PlaceOrder(
        order(key, market.open_s, client_order_id="am-0"), metadata=auth(key), timeout=10
    )
    amend = pb.AmendOrderRequest(
        order_id=original.order_id,
        replacement=order(key, market.open_s, energy_wh=400, client_order_id="am-1"),
    )
    replaced = market.book.AmendOrder(amend, metadata=auth(key), timeout=10)
    assert market.book.AmendOrder(amend, metadata=auth(key), timeout=10) == replaced
    old = market.book.GetOrder(pb.GetOrderRequest(order_id=original.order_id), metadata=auth(key), timeout=10)
    new = market.book.GetOrder(pb.GetOrderRequest(order_id=replaced.order_id), metadata=auth(key), timeout=10)
    assert (old.state, old.replaced_by_order_id) == (pb.ORDER_STATE_CANCELLED, replaced.order_id)
    assert (new.state, new.replaces_order_id, new.body.energy_wh) == (
        pb.ORDER_STATE_LIVE,
        original.order_id,
        400,
    )
    assert replaced.book_seq > original.book_seq
    again = pb.AmendOrderRequest(
        order_id=original.order_id,
        replacement=order(key, market.open_s, energy_wh=300, client_order_id="am-2"),
    )
    with pytest.raises(grpc.RpcError) as info:
        market.book.AmendOrder(again, metadata=auth(key), timeout=10)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert [(cid, state) for cid, _seq, state in market.rows(key)] == [
        ("am-0", pb.ORDER_STATE_CANCELLED),
        ("am-1", pb.ORDER_STATE_LIVE),
    ]


def test_cancel_is_idempotent_and_returns_the_cancelled_order(market: Market) -> None:
    key = market.participant()
    receipt = market.book.PlaceOrder(
        order(key, market.open_s, client_order_id="c-1"), metadata=auth(key), timeout=10
    )
    first = market.book.CancelOrder(
        pb.CancelOrderRequest(order_id=receipt.order_id), metadata=auth(key), timeout=10
    )
    second = market.book.CancelOrder(
        pb.CancelOrderRequest(order_id=receipt.order_id), metadata=auth(key), timeout=10
    )
    assert first.state == second.state == pb.ORDER_STATE_CANCELLED
    assert first.signature == second.signature and len(first.signature) == 64


def test_list_orders_pages_through_the_callers_orders_in_book_order(market: Market) -> None:
    key = market.participant()
    later_s = market.open_s + market.process.interval_s
    orders = [
        order(key, market.open_s if i % 3 else later_s, client_order_id=f"list-{i:02d}") for i in range(25)
    ]
    market.book.PlaceOrders(pb.PlaceOrdersRequest(orders=orders), metadata=auth(key), timeout=10)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = market.book.ListOrders(
            pb.ListOrdersRequest(interval_start_s=market.open_s, page_size=7, page_token=token),
            metadata=auth(key),
        )
        pages += 1
        seen += [o.body.client_order_id for o in page.orders]
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"list-{i:02d}" for i in range(25) if i % 3]
    assert pages == 3


def test_concurrent_retries_of_one_client_order_id_store_it_once(market: Market) -> None:
    key = market.participant()

    async def scenario() -> list[pb.OrderReceipt]:
        async with OrderBookClient(market.process.target, key) as client:
            request = client.order(Side.SELL, "n1", market.open_s, 1500, 80_000, "race-1")
            return await asyncio.gather(*(client.place(request) for _ in range(20)))

    receipts = asyncio.run(scenario())
    assert len({r.order_id for r in receipts}) == 1
    assert [row[0] for row in market.rows(key)] == ["race-1"]


def test_the_client_library_registers_places_in_batches_amends_cancels_and_reports_errors(
    market: Market, tmp_path: Path
) -> None:
    key_path = tmp_path / "keys" / "bot.key"
    key = BotKey.load_or_create(key_path)
    assert BotKey.load_or_create(key_path).participant_id == key.participant_id
    assert key_path.stat().st_mode & 0o777 == 0o600

    async def scenario() -> None:
        async with OrderBookClient(market.process.target, key) as client:
            participant = await client.register("n2", "client test")
            assert participant.participant_id == key.participant_id
            assert (await client.me()).node_id == "n2"
            orders = [client.order(Side.BUY, "n2", market.open_s, 100 + i, 120_000) for i in range(3)]
            results = await client.place_many(orders)
            assert all(r.HasField("receipt") for r in results)
            receipt = await client.amend(
                results[0].receipt.order_id, client.order(Side.BUY, "n2", market.open_s, 50, 120_000)
            )
            cancelled = await client.cancel(results[1].receipt.order_id)
            assert cancelled.state == pb.ORDER_STATE_CANCELLED
            listed = await client.list_orders(market.open_s)
            assert {o.order_id for o in listed if o.state == pb.ORDER_STATE_LIVE} == {
                receipt.order_id,
                results[2].receipt.order_id,
            }
            with pytest.raises(OrderBookError) as info:
                await client.place(client.order(Side.BUY, "n1", market.open_s, 100, 120_000))
            assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
            assert info.value.details.startswith("body.node_id")

    asyncio.run(scenario())


def test_the_client_retries_the_same_request_until_the_order_book_is_back(
    module_nats: NatsServer, tmp_path: Path
) -> None:
    process = OrderBookProcess(module_nats.url, f"sqlite:///{tmp_path / 'retry.db'}", tmp_path / "retry")
    key = BotKey.generate()

    async def scenario() -> pb.OrderReceipt:
        async with OrderBookClient(process.target, key, timeout_s=2, retry_for_s=30) as client:
            await asyncio.to_thread(process.start)
            await client.register("n1")
            process.kill()
            request = client.order(Side.BUY, "n1", process.first_open_s() + 600, 100, 100_000, "retry-1")
            pending = asyncio.ensure_future(client.place(request))
            await asyncio.sleep(1.0)
            assert not pending.done()
            await asyncio.to_thread(process.start)
            return await pending

    started = time.monotonic()
    try:
        receipt = asyncio.run(scenario())
    finally:
        process.stop()
    assert receipt.client_order_id == "retry-1" and receipt.book_seq == 1
    assert time.monotonic() - started < 30


def test_order_events_are_published_when_enabled(
    order_book_factory: OrderBookFactory, sqlite_url: str, nats_server: NatsServer
) -> None:
    process = order_book_factory(sqlite_url, extra={"publish-order-events": "true"})
    channel, book = stub(process.target)
    key = BotKey.generate()
    register(book, key, "n1")
    start_s = process.first_open_s() + 3 * process.interval_s
    first = book.PlaceOrder(order(key, start_s, client_order_id="e1"), metadata=auth(key))
    second = (
        book.PlaceOrders(
            pb.PlaceOrdersRequest(orders=[order(key, start_s, client_order_id="e2")]), metadata=auth(key)
        )
        .results[0]
        .receipt
    )
    amended = book.AmendOrder(
        pb.AmendOrderRequest(
            order_id=first.order_id, replacement=order(key, start_s, energy_wh=10, client_order_id="e3")
        ),
        metadata=auth(key),
    )
    book.CancelOrder(pb.CancelOrderRequest(order_id=second.order_id), metadata=auth(key))
    channel.close()
    events = order_events(nats_server.url, count=5)
    assert [(e.kind, e.order.order_id) for e in events] == [
        (events_pb2.ORDER_EVENT_KIND_PLACED, first.order_id),
        (events_pb2.ORDER_EVENT_KIND_PLACED, second.order_id),
        (events_pb2.ORDER_EVENT_KIND_AMENDED, amended.order_id),
        (events_pb2.ORDER_EVENT_KIND_CANCELLED, first.order_id),
        (events_pb2.ORDER_EVENT_KIND_CANCELLED, second.order_id),
    ]
    assert all(e.interval_start_s == start_s and e.order.participant_id == key.participant_id for e in events)
    assert [e.order.book_seq for e in events[:3]] == [first.book_seq, second.book_seq, amended.book_seq]


def test_a_large_batch_is_stored_exactly_as_sent(market: Market) -> None:
    key = market.participant()
    sent = [
        order(
            key,
            market.open_s,
            energy_wh=100 + i,
            price_micro_per_kwh=50_000 + 100 * i,
            client_order_id=f"big-{i:03d}",
        )
        for i in range(300)
    ]
    response = market.book.PlaceOrders(pb.PlaceOrdersRequest(orders=sent), metadata=auth(key), timeout=30)
    assert all(r.HasField("receipt") for r in response.results)
    stored = market.book.ListOrders(pb.ListOrdersRequest(page_size=1000), metadata=auth(key)).orders
    assert [(o.body, o.signature) for o in stored] == [(s.body, s.signature) for s in sent]
    seqs = [o.book_seq for o in stored]
    assert seqs == list(range(seqs[0], seqs[0] + 300))
