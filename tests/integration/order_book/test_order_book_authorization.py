"""Authorisation matrix: every RPC × {own participant, another participant, no credentials, expired, forged}.

One order book process per database backend holds two participants (A at
n1, B at n2) with live orders, cleared orders with fills and meters, plus an
operator key. A acts in every cell; "another" means A aims at B's data. The
acting participant always comes from the token: another participant's orders
and fills are never returned and cannot be changed (NOT_FOUND), and calls
without valid credentials are UNAUTHENTICATED and change nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from order_book_harness import (
    OrderBookProcess,
    auth,
    details,
    order,
    publish_results,
    read_stream,
    register,
    stub,
    toy_clear,
    wait_for_request,
)

from services.domain.credentials import b64url, make_token
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2_grpc as pb_grpc
from services.order_book.client import BotKey
from services.order_book.domain.orders import Side
from services.platform.nats_server import NatsServer

WHO = ("own", "another", "none", "expired", "forged")
Metadata = tuple[tuple[str, str], ...]


@dataclass
class World:
    book: pb_grpc.OrderBookStub
    process: OrderBookProcess
    a: BotKey
    b: BotKey
    operator: BotKey
    far_s: int
    a_live: pb.OrderReceipt
    b_live: pb.OrderReceipt
    a_filled: pb.OrderReceipt
    b_filled: pb.OrderReceipt

    def metadata(self, who: str) -> Metadata:
        """A's credentials for `who`; 'own' and 'another' both authenticate as A."""
        if who in ("own", "another"):
            return auth(self.a)
        if who == "none":
            return ()
        if who == "expired":
            return auth(self.a, issued_at_s=int(time.time()) - 4000, lifetime_s=600)
        # Forged: A's key and times, signed by B.
        issued = int(time.time())
        genuine = make_token(self.b.signing_key, "p2pgrid.orderbook.v1", issued, issued + 600).split(".")
        genuine[1] = b64url(self.a.public_key)
        return (("authorization", "Bearer " + ".".join(genuine)),)

    def orders_of(self, key: BotKey) -> list[pb.Order]:
        return list(
            self.book.ListOrders(pb.ListOrdersRequest(page_size=1000), metadata=auth(key), timeout=10).orders
        )

    def state_of(self, key: BotKey, order_id: str) -> int:
        return int(
            self.book.GetOrder(pb.GetOrderRequest(order_id=order_id), metadata=auth(key), timeout=10).state
        )


@pytest.fixture(scope="module")
def world(
    module_nats: NatsServer, module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[World]:
    a, b, operator = BotKey.generate(), BotKey.generate(), BotKey.generate()
    process = OrderBookProcess(
        module_nats.url,
        module_database_url,
        Path(tmp_path_factory.mktemp("auth")),
        speedup=10.0,
        extra={"operator-public-keys": b64url(operator.public_key)},
    ).start()
    channel, book = stub(process.target)
    try:
        register(book, a, "n1")
        register(book, b, "n2")
        # An interval whose gate is at least 1 s (wall) away, and one far from its gate.
        soon_s = process.first_open_s()
        if process.wall_until_s(soon_s - process.gate_closure_s) < 1.0:
            soon_s += process.interval_s
        far_s = soon_s + 10 * process.interval_s

        def place(key: BotKey, node: str, start_s: int, side: Side, cid: str) -> pb.OrderReceipt:
            request = order(
                key, start_s, side=side, node_id=node, client_order_id=cid, price_micro_per_kwh=100_000
            )
            return book.PlaceOrder(request, metadata=auth(key), timeout=10)

        a_filled = place(a, "n1", soon_s, Side.BUY, "a-soon")
        b_filled = place(b, "n2", soon_s, Side.SELL, "b-soon")
        a_live = place(a, "n1", far_s, Side.BUY, "a-far")
        b_live = place(b, "n2", far_s, Side.SELL, "b-far")
        for key, meter_id in ((a, "m-a"), (b, "m-b")):
            book.RegisterMeter(
                pb.RegisterMeterRequest(
                    meter_id=meter_id,
                    participant_id=key.participant_id,
                    node_id="n1" if key is a else "n2",
                ),
                metadata=auth(operator),
                timeout=10,
            )
        request = wait_for_request(module_nats.url, soon_s)
        publish_results(module_nats.url, [toy_clear(request)])
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            states = [
                book.GetOrder(pb.GetOrderRequest(order_id=r.order_id), metadata=auth(k), timeout=10).state
                for k, r in ((a, a_filled), (b, b_filled))
            ]
            if all(s == pb.ORDER_STATE_FILLED for s in states):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the toy clearing result was not turned into fills")
        yield World(book, process, a, b, operator, far_s, a_live, b_live, a_filled, b_filled)
    finally:
        channel.close()
        process.stop()


def call_code(fn: Callable[[], Any]) -> grpc.StatusCode:
    try:
        fn()
    except grpc.RpcError as error:
        return error.code()
    return grpc.StatusCode.OK


def unauthenticated(who: str) -> bool:
    return who in ("none", "expired", "forged")


@pytest.mark.parametrize("who", WHO)
def test_register_participant_only_registers_the_callers_own_key(world: World, who: str) -> None:
    stranger = BotKey.generate()
    key = world.a if who == "own" else stranger
    request = pb.RegisterParticipantRequest(public_key=key.public_key, node_id="n1")
    code = call_code(
        lambda: world.book.RegisterParticipant(request, metadata=world.metadata(who), timeout=10)
    )
    expected = {"own": grpc.StatusCode.OK, "another": grpc.StatusCode.PERMISSION_DENIED}
    assert code == expected.get(who, grpc.StatusCode.UNAUTHENTICATED)
    if who != "own":
        lookup = pb.GetParticipantRequest(participant_id=stranger.participant_id)
        assert (
            call_code(lambda: world.book.GetParticipant(lookup, metadata=auth(world.operator), timeout=10))
            == grpc.StatusCode.NOT_FOUND
        )


def test_an_operator_registers_another_participants_key(world: World) -> None:
    other = BotKey.generate()
    request = pb.RegisterParticipantRequest(
        public_key=other.public_key, node_id="n2", display_name="by operator"
    )
    participant = world.book.RegisterParticipant(request, metadata=auth(world.operator), timeout=10)
    assert participant.participant_id == other.participant_id
    assert (
        world.book.GetParticipant(pb.GetParticipantRequest(), metadata=auth(other), timeout=10).node_id
        == "n2"
    )


@pytest.mark.parametrize("who", WHO)
def test_get_participant_answers_only_the_caller(world: World, who: str) -> None:
    wanted = "" if who == "own" else world.b.participant_id
    request = pb.GetParticipantRequest(participant_id=wanted)
    if who == "own":
        assert world.book.GetParticipant(
            request, metadata=world.metadata(who), timeout=10
        ).participant_id == (world.a.participant_id)
        return
    code = call_code(lambda: world.book.GetParticipant(request, metadata=world.metadata(who), timeout=10))
    assert code == (grpc.StatusCode.UNAUTHENTICATED if unauthenticated(who) else grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("who", WHO)
def test_register_meter_is_for_operators_only(world: World, who: str) -> None:
    owner = world.a if who == "own" else world.b
    meter_id = f"m-{who}-{time.monotonic_ns()}"
    request = pb.RegisterMeterRequest(
        meter_id=meter_id, participant_id=owner.participant_id, node_id="n1" if owner is world.a else "n2"
    )
    code = call_code(lambda: world.book.RegisterMeter(request, metadata=world.metadata(who), timeout=10))
    assert code == (
        grpc.StatusCode.UNAUTHENTICATED if unauthenticated(who) else grpc.StatusCode.PERMISSION_DENIED
    )
    meters = world.book.ListMeters(pb.ListMetersRequest(), metadata=auth(world.operator), timeout=10).meters
    assert meter_id not in {m.meter_id for m in meters}


@pytest.mark.parametrize("who", WHO)
def test_list_meters_never_returns_another_participants_meters(world: World, who: str) -> None:
    if unauthenticated(who):
        code = call_code(
            lambda: world.book.ListMeters(pb.ListMetersRequest(), metadata=world.metadata(who), timeout=10)
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
        return
    meters = world.book.ListMeters(pb.ListMetersRequest(), metadata=world.metadata(who), timeout=10).meters
    assert {m.participant_id for m in meters} == {world.a.participant_id}
    everyone = world.book.ListMeters(pb.ListMetersRequest(), metadata=auth(world.operator), timeout=10).meters
    assert {"m-a", "m-b"} <= {m.meter_id for m in everyone}


@pytest.mark.parametrize("who", WHO)
@pytest.mark.parametrize("batch", [False, True], ids=["PlaceOrder", "PlaceOrders"])
def test_orders_are_placed_only_for_the_authenticated_signer(world: World, who: str, batch: bool) -> None:
    cid = f"place-{who}-{int(batch)}-{time.monotonic_ns()}"
    signer = world.b if who == "another" else world.a
    node = "n2" if who == "another" else "n1"
    request = order(signer, world.far_s, node_id=node, client_order_id=cid)
    before_a, before_b = len(world.orders_of(world.a)), len(world.orders_of(world.b))

    def place() -> Any:
        if batch:
            response = world.book.PlaceOrders(
                pb.PlaceOrdersRequest(orders=[request]), metadata=world.metadata(who), timeout=10
            )
            result = response.results[0]
            if result.HasField("error"):
                assert result.error.field == "orders[0].body.node_id" if who == "another" else True
                return result.error.code
            return "OK"
        world.book.PlaceOrder(request, metadata=world.metadata(who), timeout=10)
        return "OK"

    if unauthenticated(who):
        assert call_code(place) == grpc.StatusCode.UNAUTHENTICATED
    elif who == "another":
        # B's signed order sent with A's token is A's order: A is not at n2, and B's signature is not A's.
        outcome = place() if batch else call_code(place)
        assert outcome in ("INVALID_ARGUMENT", grpc.StatusCode.INVALID_ARGUMENT)
    else:
        assert place() == "OK"
    grown = 1 if who == "own" else 0
    assert len(world.orders_of(world.a)) == before_a + grown
    assert len(world.orders_of(world.b)) == before_b


def test_an_order_signed_by_another_key_for_the_callers_own_node_is_refused_at_the_signature(
    world: World,
) -> None:
    request = order(world.b, world.far_s, node_id="n1", client_order_id=f"sig-{time.monotonic_ns()}")
    with pytest.raises(grpc.RpcError) as info:
        world.book.PlaceOrder(request, metadata=auth(world.a), timeout=10)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(info.value).startswith("signature:")


@pytest.mark.parametrize("who", WHO)
def test_amend_changes_only_the_callers_own_orders(world: World, who: str) -> None:
    own = world.book.PlaceOrder(
        order(world.a, world.far_s, client_order_id=f"amend-src-{who}-{time.monotonic_ns()}"),
        metadata=auth(world.a),
        timeout=10,
    )
    target = own.order_id if who == "own" else world.b_live.order_id
    replacement = order(
        world.a, world.far_s, energy_wh=500, client_order_id=f"amend-new-{who}-{time.monotonic_ns()}"
    )
    request = pb.AmendOrderRequest(order_id=target, replacement=replacement)
    code = call_code(lambda: world.book.AmendOrder(request, metadata=world.metadata(who), timeout=10))
    expected = {"own": grpc.StatusCode.OK, "another": grpc.StatusCode.NOT_FOUND}
    assert code == expected.get(who, grpc.StatusCode.UNAUTHENTICATED)
    assert world.state_of(world.b, world.b_live.order_id) == pb.ORDER_STATE_LIVE
    own_state = world.state_of(world.a, own.order_id)
    assert own_state == (pb.ORDER_STATE_CANCELLED if who == "own" else pb.ORDER_STATE_LIVE)


@pytest.mark.parametrize("who", WHO)
def test_cancel_changes_only_the_callers_own_orders(world: World, who: str) -> None:
    own = world.book.PlaceOrder(
        order(world.a, world.far_s, client_order_id=f"cancel-{who}-{time.monotonic_ns()}"),
        metadata=auth(world.a),
        timeout=10,
    )
    target = own.order_id if who == "own" else world.b_live.order_id
    request = pb.CancelOrderRequest(order_id=target)
    code = call_code(lambda: world.book.CancelOrder(request, metadata=world.metadata(who), timeout=10))
    expected = {"own": grpc.StatusCode.OK, "another": grpc.StatusCode.NOT_FOUND}
    assert code == expected.get(who, grpc.StatusCode.UNAUTHENTICATED)
    assert world.state_of(world.b, world.b_live.order_id) == pb.ORDER_STATE_LIVE
    assert world.state_of(world.a, own.order_id) == (
        pb.ORDER_STATE_CANCELLED if who == "own" else pb.ORDER_STATE_LIVE
    )


@pytest.mark.parametrize("who", WHO)
def test_get_order_returns_only_the_callers_own_orders(world: World, who: str) -> None:
    target = world.a_live.order_id if who == "own" else world.b_live.order_id
    request = pb.GetOrderRequest(order_id=target)
    if who == "own":
        got = world.book.GetOrder(request, metadata=world.metadata(who), timeout=10)
        assert (got.order_id, got.participant_id) == (target, world.a.participant_id)
        return
    code = call_code(lambda: world.book.GetOrder(request, metadata=world.metadata(who), timeout=10))
    assert code == (grpc.StatusCode.UNAUTHENTICATED if unauthenticated(who) else grpc.StatusCode.NOT_FOUND)


@pytest.mark.parametrize("who", WHO)
def test_list_orders_returns_only_the_callers_own_orders(world: World, who: str) -> None:
    request = pb.ListOrdersRequest(page_size=1000)
    if unauthenticated(who):
        code = call_code(lambda: world.book.ListOrders(request, metadata=world.metadata(who), timeout=10))
        assert code == grpc.StatusCode.UNAUTHENTICATED
        return
    orders = world.book.ListOrders(request, metadata=world.metadata(who), timeout=10).orders
    assert {o.participant_id for o in orders} == {world.a.participant_id}
    ids = {o.order_id for o in orders}
    assert {world.a_live.order_id, world.a_filled.order_id} <= ids
    assert not ids & {world.b_live.order_id, world.b_filled.order_id}


@pytest.mark.parametrize("who", WHO)
def test_stream_fills_carries_only_the_callers_own_fills(world: World, who: str) -> None:
    call = world.book.StreamFills(pb.StreamFillsRequest(), metadata=world.metadata(who), timeout=3)
    if unauthenticated(who):
        assert call_code(lambda: list(call)) == grpc.StatusCode.UNAUTHENTICATED
        return
    fills = read_stream(call, count=100, timeout_s=3)
    order_ids = {f.order_id for f in fills}
    assert world.a_filled.order_id in order_ids
    assert world.b_filled.order_id not in order_ids
    mine = {o.order_id for o in world.orders_of(world.a)}
    assert order_ids <= mine


@pytest.mark.parametrize("who", WHO)
def test_stream_market_data_needs_credentials(world: World, who: str) -> None:
    call = world.book.StreamMarketData(pb.StreamMarketDataRequest(), metadata=world.metadata(who), timeout=3)
    if unauthenticated(who):
        assert call_code(lambda: list(call)) == grpc.StatusCode.UNAUTHENTICATED
        return
    events = read_stream(call, count=200, timeout_s=2)
    kinds = {e.WhichOneof("event") for e in events}
    assert {"interval_opened", "interval_closed", "interval_cleared"} <= kinds


def test_a_valid_token_of_an_unregistered_key_is_unauthenticated_except_for_registration(
    world: World,
) -> None:
    stranger = BotKey.generate()
    request = order(stranger, world.far_s, client_order_id="stranger-1")
    assert (
        call_code(lambda: world.book.PlaceOrder(request, metadata=auth(stranger), timeout=10))
        == grpc.StatusCode.UNAUTHENTICATED
    )
    register(world.book, stranger, "n1")
    assert world.book.PlaceOrder(request, metadata=auth(stranger), timeout=10).book_seq > 0


def test_a_token_for_another_audience_or_longer_than_allowed_is_unauthenticated(world: World) -> None:
    issued = int(time.time())
    other_audience = make_token(world.a.signing_key, "p2pgrid.ledger.v1", issued, issued + 600)
    too_long = make_token(world.a.signing_key, "p2pgrid.orderbook.v1", issued, issued + 10 * 24 * 3600)
    for bad in (other_audience, too_long, "not-a-token"):
        metadata = (("authorization", f"Bearer {bad}"),)
        code = call_code(
            lambda metadata=metadata: world.book.GetParticipant(  # type: ignore[misc]
                pb.GetParticipantRequest(), metadata=metadata, timeout=10
            )
        )
        assert code == grpc.StatusCode.UNAUTHENTICATED
