"""Bad input on every field gets its precise status naming the field, and nothing is stored.

Each case starts from a valid signed order of a fresh participant, breaks one
field (re-signing the body, so the broken field is the only problem unless
the signature itself is the case), and checks the status code, that the
message begins with the field's name, and that the participant has no order
afterwards, through the API and in the database itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from order_book_harness import OrderBookProcess, auth, details, order, register, stub, trailing
from sqlalchemy import Engine, func, select

from services.domain.credentials import GROUP_ORDER_L
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2_grpc as pb_grpc
from services.order_book.adapters.store import orders_t
from services.order_book.client import BotKey
from services.order_book.domain.orders import encode_order
from services.platform.db import make_engine
from services.platform.nats_server import NatsServer

MAX_BATCH = 10
MAX_ENERGY_WH = 5_000_000
MAX_PRICE = 2_000_000
HORIZON = 8
INVALID = grpc.StatusCode.INVALID_ARGUMENT


@dataclass
class Market:
    book: pb_grpc.OrderBookStub
    process: OrderBookProcess
    engine: Engine
    open_s: int
    past_s: int
    beyond_s: int

    def participant(self) -> BotKey:
        key = BotKey.generate()
        register(self.book, key, "n1")
        return key

    def stored(self, key: BotKey) -> int:
        with self.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.count())
                    .select_from(orders_t)
                    .where(orders_t.c.participant_id == key.participant_id)
                ).scalar_one()
            )

    def listed(self, key: BotKey) -> int:
        return len(self.book.ListOrders(pb.ListOrdersRequest(), metadata=auth(key), timeout=10).orders)


@pytest.fixture(scope="module")
def market(
    module_nats: NatsServer, module_database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Market]:
    process = OrderBookProcess(
        module_nats.url,
        module_database_url,
        Path(tmp_path_factory.mktemp("bad")),
        extra={
            "max-batch-orders": str(MAX_BATCH),
            "rate-limit-orders-per-s": "5",
            "rate-limit-burst": "20",
            "max-energy-wh": str(MAX_ENERGY_WH),
            "max-price-micro-per-kwh": str(MAX_PRICE),
            "horizon-intervals": str(HORIZON),
        },
    ).start()
    channel, book = stub(process.target)
    engine = make_engine(module_database_url)
    first = process.first_open_s()
    try:
        yield Market(
            book,
            process,
            engine,
            open_s=first + 3 * process.interval_s,
            past_s=first - process.interval_s,
            beyond_s=first + HORIZON * process.interval_s,
        )
    finally:
        engine.dispose()
        channel.close()
        process.stop()


def resign(key: BotKey, request: pb.PlaceOrderRequest) -> None:
    b = request.body
    message = encode_order(
        b.client_order_id, b.side, b.node_id, b.interval_start_s, b.energy_wh, b.price_micro_per_kwh
    )
    request.signature = key.sign(message)


Mutation = Callable[[Market, BotKey, pb.PlaceOrderRequest], None]


def body_field(name: str, value: object) -> Mutation:
    def mutate(_market: Market, key: BotKey, request: pb.PlaceOrderRequest) -> None:
        setattr(request.body, name, value)
        resign(key, request)

    return mutate


def interval(which: str) -> Mutation:
    def mutate(market: Market, key: BotKey, request: pb.PlaceOrderRequest) -> None:
        request.body.interval_start_s = {
            "missing": 0,
            "negative": -market.process.interval_s,
            "off-grid": market.open_s + 1,
            "past": market.past_s,
            "beyond": market.beyond_s,
        }[which]
        resign(key, request)

    return mutate


def drop_body(_market: Market, _key: BotKey, request: pb.PlaceOrderRequest) -> None:
    request.ClearField("body")


def signature(kind: str) -> Mutation:
    def mutate(_market: Market, _key: BotKey, request: pb.PlaceOrderRequest) -> None:
        sig = request.signature
        if kind == "missing":
            request.signature = b""
        elif kind == "short":
            request.signature = sig[:63]
        elif kind == "flipped":
            request.signature = sig[:10] + bytes([sig[10] ^ 1]) + sig[11:]
        elif kind == "other-key":
            resign(BotKey.generate(), request)
        else:
            # Malleated: S + L verifies under a lax verifier; canonical checks refuse it.
            s_value = int.from_bytes(sig[32:], "little") + GROUP_ORDER_L
            request.signature = sig[:32] + s_value.to_bytes(32, "little")

    return mutate


CASES: list[tuple[str, Mutation, grpc.StatusCode, str]] = [
    ("body missing", drop_body, INVALID, "body"),
    ("client_order_id missing", body_field("client_order_id", ""), INVALID, "body.client_order_id"),
    ("client_order_id too long", body_field("client_order_id", "x" * 65), INVALID, "body.client_order_id"),
    ("client_order_id with a space", body_field("client_order_id", "a b"), INVALID, "body.client_order_id"),
    ("side missing", body_field("side", 0), INVALID, "body.side"),
    ("side unknown", body_field("side", 7), INVALID, "body.side"),
    ("node missing", body_field("node_id", ""), INVALID, "body.node_id"),
    ("node unknown", body_field("node_id", "n9"), INVALID, "body.node_id"),
    ("node of another participant", body_field("node_id", "n2"), INVALID, "body.node_id"),
    ("interval missing", interval("missing"), INVALID, "body.interval_start_s"),
    ("interval negative", interval("negative"), INVALID, "body.interval_start_s"),
    ("interval off the grid", interval("off-grid"), INVALID, "body.interval_start_s"),
    ("interval in the past", interval("past"), grpc.StatusCode.FAILED_PRECONDITION, "body.interval_start_s"),
    ("interval after the horizon", interval("beyond"), INVALID, "body.interval_start_s"),
    ("energy missing", body_field("energy_wh", 0), INVALID, "body.energy_wh"),
    ("energy negative", body_field("energy_wh", -1000), INVALID, "body.energy_wh"),
    ("energy above the limit", body_field("energy_wh", MAX_ENERGY_WH + 1), INVALID, "body.energy_wh"),
    ("price missing", body_field("price_micro_per_kwh", 0), INVALID, "body.price_micro_per_kwh"),
    ("price negative", body_field("price_micro_per_kwh", -100_000), INVALID, "body.price_micro_per_kwh"),
    ("price off the tick", body_field("price_micro_per_kwh", 100_050), INVALID, "body.price_micro_per_kwh"),
    (
        "price above the limit",
        body_field("price_micro_per_kwh", MAX_PRICE + 100),
        INVALID,
        "body.price_micro_per_kwh",
    ),
    ("signature missing", signature("missing"), INVALID, "signature"),
    ("signature too short", signature("short"), INVALID, "signature"),
    ("signature with a flipped bit", signature("flipped"), INVALID, "signature"),
    ("signature by another key", signature("other-key"), INVALID, "signature"),
    ("signature not canonical (S + L)", signature("malleated"), INVALID, "signature"),
]


@pytest.mark.parametrize(("case", "mutate", "code", "field"), CASES, ids=[c[0] for c in CASES])
def test_a_bad_field_in_place_order_gets_its_status_naming_the_field_and_stores_nothing(
    market: Market, case: str, mutate: Mutation, code: grpc.StatusCode, field: str
) -> None:
    key = market.participant()
    request = order(key, market.open_s, client_order_id=f"bad-{time.monotonic_ns()}")
    mutate(market, key, request)
    with pytest.raises(grpc.RpcError) as info:
        market.book.PlaceOrder(request, metadata=auth(key), timeout=10)
    assert info.value.code() == code, details(info.value)
    assert details(info.value).startswith(f"{field}: "), details(info.value)
    assert market.listed(key) == 0
    assert market.stored(key) == 0


def test_a_closed_interval_is_refused_naming_the_interval_and_its_gate_time(market: Market) -> None:
    key = market.participant()
    request = order(key, market.past_s, client_order_id="late-1")
    with pytest.raises(grpc.RpcError) as info:
        market.book.PlaceOrder(request, metadata=auth(key), timeout=10)
    gate_s = market.past_s - market.process.gate_closure_s
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert f"({market.past_s})" in details(info.value)
    assert "gate closed at" in details(info.value) and f"({gate_s})" in details(info.value)


@pytest.mark.parametrize(("case", "mutate", "code", "field"), CASES[::3], ids=[c[0] for c in CASES[::3]])
def test_a_bad_order_in_a_batch_gets_its_own_error_and_only_the_good_ones_are_stored(
    market: Market, case: str, mutate: Mutation, code: grpc.StatusCode, field: str
) -> None:
    key = market.participant()
    good = order(key, market.open_s, client_order_id=f"good-{time.monotonic_ns()}")
    bad = order(key, market.open_s, client_order_id=f"bad-{time.monotonic_ns()}")
    mutate(market, key, bad)
    response = market.book.PlaceOrders(
        pb.PlaceOrdersRequest(orders=[good, bad]), metadata=auth(key), timeout=10
    )
    assert response.results[0].HasField("receipt")
    error = response.results[1].error
    assert (error.code, error.field) == (code.name, f"orders[1].{field}")
    assert market.stored(key) == 1
    assert [
        o.body.client_order_id
        for o in market.book.ListOrders(pb.ListOrdersRequest(), metadata=auth(key)).orders
    ] == [good.body.client_order_id]


@pytest.mark.parametrize("size", [0, MAX_BATCH + 1])
def test_an_empty_or_oversized_batch_is_refused_as_a_whole(market: Market, size: int) -> None:
    key = market.participant()
    orders = [order(key, market.open_s, client_order_id=f"big-{i}") for i in range(size)]
    with pytest.raises(grpc.RpcError) as info:
        market.book.PlaceOrders(pb.PlaceOrdersRequest(orders=orders), metadata=auth(key), timeout=10)
    assert info.value.code() == INVALID
    assert details(info.value).startswith("orders: ")
    assert market.stored(key) == 0


def test_the_rate_limit_answers_resource_exhausted_with_the_time_to_wait(market: Market) -> None:
    key = market.participant()  # registering costs one of the 20 tokens
    for round_ in range(2):
        batch = [
            order(key, market.open_s, client_order_id=f"rate-{round_}-{i}") for i in range(MAX_BATCH - 1)
        ]
        market.book.PlaceOrders(pb.PlaceOrdersRequest(orders=batch), metadata=auth(key), timeout=10)
    stored = market.stored(key)
    batch = [order(key, market.open_s, client_order_id=f"rate-2-{i}") for i in range(MAX_BATCH)]
    with pytest.raises(grpc.RpcError) as info:
        market.book.PlaceOrders(pb.PlaceOrdersRequest(orders=batch), metadata=auth(key), timeout=10)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    retry_after_s = float(trailing(info.value)["retry-after-s"])
    assert 0.5 < retry_after_s <= MAX_BATCH / 5
    assert market.stored(key) == stored
    time.sleep(retry_after_s + 0.1)
    response = market.book.PlaceOrders(pb.PlaceOrdersRequest(orders=batch), metadata=auth(key), timeout=10)
    assert all(r.HasField("receipt") for r in response.results)


def test_bad_amend_and_cancel_requests_name_their_field_and_change_nothing(market: Market) -> None:
    key = market.participant()
    live = market.book.PlaceOrder(
        order(key, market.open_s, client_order_id="keep"), metadata=auth(key), timeout=10
    )
    replacement = order(key, market.open_s, client_order_id="new")
    bad_replacement = order(key, market.open_s, energy_wh=-1, client_order_id="neg")
    bad_replacement.body.energy_wh = -1
    resign(key, bad_replacement)
    cases = [
        (
            lambda: market.book.AmendOrder(pb.AmendOrderRequest(replacement=replacement), metadata=auth(key)),
            INVALID,
            "order_id",
        ),
        (
            lambda: market.book.AmendOrder(pb.AmendOrderRequest(order_id=live.order_id), metadata=auth(key)),
            INVALID,
            "replacement",
        ),
        (
            lambda: market.book.AmendOrder(
                pb.AmendOrderRequest(order_id="nope", replacement=replacement), metadata=auth(key)
            ),
            grpc.StatusCode.NOT_FOUND,
            "order_id",
        ),
        (
            lambda: market.book.AmendOrder(
                pb.AmendOrderRequest(order_id=live.order_id, replacement=bad_replacement), metadata=auth(key)
            ),
            INVALID,
            "replacement.body.energy_wh",
        ),
        (lambda: market.book.CancelOrder(pb.CancelOrderRequest(), metadata=auth(key)), INVALID, "order_id"),
        (
            lambda: market.book.CancelOrder(pb.CancelOrderRequest(order_id="nope"), metadata=auth(key)),
            grpc.StatusCode.NOT_FOUND,
            "order_id",
        ),
        (lambda: market.book.GetOrder(pb.GetOrderRequest(), metadata=auth(key)), INVALID, "order_id"),
    ]
    for call, code, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            call()  # type: ignore[no-untyped-call]
        assert (info.value.code(), details(info.value).split(":")[0]) == (code, field)
    assert market.stored(key) == 1
    got = market.book.GetOrder(pb.GetOrderRequest(order_id=live.order_id), metadata=auth(key))
    assert got.state == pb.ORDER_STATE_LIVE and got.body.energy_wh == 1000


def test_bad_registrations_and_list_requests_name_their_field(market: Market) -> None:
    key = BotKey.generate()
    small_order_point = bytes(32)  # the identity point encoded as all zeros is not a valid key
    cases = [
        (pb.RegisterParticipantRequest(node_id="n1"), "public_key"),
        (pb.RegisterParticipantRequest(public_key=key.public_key[:31], node_id="n1"), "public_key"),
        (pb.RegisterParticipantRequest(public_key=small_order_point, node_id="n1"), "public_key"),
        (pb.RegisterParticipantRequest(public_key=key.public_key), "node_id"),
        (pb.RegisterParticipantRequest(public_key=key.public_key, node_id="n9"), "node_id"),
        (
            pb.RegisterParticipantRequest(public_key=key.public_key, node_id="n1", display_name="x" * 65),
            "display_name",
        ),
    ]
    for request, field in cases:
        with pytest.raises(grpc.RpcError) as info:
            market.book.RegisterParticipant(request, metadata=auth(key), timeout=10)
        assert (info.value.code(), details(info.value).split(":")[0]) == (INVALID, field)
    with pytest.raises(grpc.RpcError) as info:
        market.book.GetParticipant(pb.GetParticipantRequest(), metadata=auth(key), timeout=10)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    registered = market.participant()
    list_cases: list[tuple[pb.ListOrdersRequest, str]] = [
        (pb.ListOrdersRequest(page_size=-1), "page_size"),
        (pb.ListOrdersRequest(page_size=1001), "page_size"),
        (pb.ListOrdersRequest(page_token="abc"), "page_token"),
        (pb.ListOrdersRequest(interval_start_s=market.open_s + 1), "interval_start_s"),
    ]
    for list_request, field in list_cases:
        with pytest.raises(grpc.RpcError) as info:
            market.book.ListOrders(list_request, metadata=auth(registered), timeout=10)
        assert (info.value.code(), details(info.value).split(":")[0]) == (INVALID, field)
