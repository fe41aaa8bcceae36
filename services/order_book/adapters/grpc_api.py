"""The OrderBook gRPC servicer: each method converts the request to domain values, calls one use case, converts back."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from services.domain.errors import DomainError, InvalidArgument
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2 as pb
from services.gen.p2pgrid.orderbook.v1 import order_book_pb2_grpc as pb_grpc
from services.order_book.book import OrderBook, OrderInput
from services.order_book.domain.market import IntervalCleared, IntervalClosed, IntervalOpened, MarketEvent
from services.order_book.domain.orders import (
    Fill,
    Meter,
    OrderBody,
    OrderRecord,
    Participant,
    Receipt,
    Side,
    SignedOrder,
)
from services.platform.grpc_server import current_identity

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["OrderBook"].full_name
_SIDES = {1: Side.BUY, 2: Side.SELL}


def order_input(request: pb.PlaceOrderRequest, prefix: str) -> OrderInput:
    """A request's order as domain values, or the error naming what is missing."""
    if not request.HasField("body"):
        return OrderInput(InvalidArgument("is required", field=f"{prefix}body"), prefix)
    body = request.body
    side = _SIDES.get(body.side)
    if side is None:
        return OrderInput(
            InvalidArgument("must be SIDE_BUY or SIDE_SELL", field=f"{prefix}body.side"), prefix
        )
    return OrderInput(
        SignedOrder(
            OrderBody(
                body.client_order_id,
                side,
                body.node_id,
                body.interval_start_s,
                body.energy_wh,
                body.price_micro_per_kwh,
            ),
            request.signature,
        ),
        prefix,
    )


def receipt_message(receipt: Receipt) -> pb.OrderReceipt:
    return pb.OrderReceipt(
        order_id=receipt.order_id,
        client_order_id=receipt.client_order_id,
        book_seq=receipt.book_seq,
        accepted_at_s=receipt.accepted_at_s,
    )


def error_message(error: DomainError) -> pb.ErrorDetail:
    return pb.ErrorDetail(code=error.status, field=error.field, message=error.message)


def body_message(body: OrderBody) -> pb.OrderBody:
    return pb.OrderBody(
        client_order_id=body.client_order_id,
        side=int(body.side),  # type: ignore[arg-type]
        node_id=body.node_id,
        interval_start_s=body.interval_start_s,
        energy_wh=body.energy_wh,
        price_micro_per_kwh=body.price_micro_per_kwh,
    )


def order_message(record: OrderRecord) -> pb.Order:
    return pb.Order(
        order_id=record.order_id,
        participant_id=record.participant_id,
        body=body_message(record.body),
        state=int(record.state),  # type: ignore[arg-type]
        book_seq=record.book_seq,
        accepted_wh=record.accepted_wh or 0,
        fill_price_micro_per_kwh=record.fill_price_micro_per_kwh or 0,
        accepted_at_s=record.accepted_at_s,
        signature=record.signature,
        replaced_by_order_id=record.replaced_by_order_id or "",
        replaces_order_id=record.replaces_order_id or "",
    )


def participant_message(participant: Participant, operator: bool) -> pb.Participant:
    return pb.Participant(
        participant_id=participant.participant_id,
        public_key=participant.public_key,
        node_id=participant.node_id,
        display_name=participant.display_name,
        operator=operator,
        registered_at_s=participant.registered_at_s,
    )


def meter_message(meter: Meter) -> pb.Meter:
    return pb.Meter(
        meter_id=meter.meter_id,
        participant_id=meter.participant_id,
        node_id=meter.node_id,
        registered_at_s=meter.registered_at_s,
    )


def fill_message(fill: Fill) -> pb.Fill:
    return pb.Fill(
        fill_seq=fill.fill_seq,
        order_id=fill.order_id,
        client_order_id=fill.client_order_id,
        interval_start_s=fill.interval_start_s,
        accepted_wh=fill.accepted_wh,
        price_micro_per_kwh=fill.price_micro_per_kwh,
        side=int(fill.side),  # type: ignore[arg-type]
        node_id=fill.node_id,
        energy_wh=fill.energy_wh,
    )


def market_message(event: MarketEvent) -> pb.MarketData:
    if isinstance(event, IntervalOpened):
        return pb.MarketData(
            interval_opened=pb.IntervalOpened(
                interval_start_s=event.interval_start_s, gate_closure_s=event.gate_closure_s
            )
        )
    if isinstance(event, IntervalClosed):
        return pb.MarketData(
            interval_closed=pb.IntervalClosed(
                interval_start_s=event.interval_start_s, book_seq_max=event.book_seq_max, orders=event.orders
            )
        )
    cleared: IntervalCleared = event
    return pb.MarketData(
        interval_cleared=pb.IntervalCleared(
            interval_start_s=cleared.interval_start_s,
            nodes=[
                common_pb2.NodePrice(node_id=node_id, price_micro_per_kwh=price)
                for node_id, price in cleared.node_prices
            ],
            volume_wh=cleared.volume_wh,
        )
    )


class OrderBookServicer(pb_grpc.OrderBookServicer):
    """Translation only; `OrderBook` holds the rules."""

    def __init__(self, book: OrderBook) -> None:
        self.book = book

    async def RegisterParticipant(
        self, request: pb.RegisterParticipantRequest, context: Any
    ) -> pb.Participant:
        identity = current_identity()
        participant = await self.book.register_participant(
            identity, request.public_key, request.node_id, request.display_name
        )
        return participant_message(participant, participant.participant_id in self.book.operator_ids)

    async def GetParticipant(self, request: pb.GetParticipantRequest, context: Any) -> pb.Participant:
        participant = await self.book.get_participant(current_identity(), request.participant_id)
        return participant_message(participant, participant.participant_id in self.book.operator_ids)

    async def RegisterMeter(self, request: pb.RegisterMeterRequest, context: Any) -> pb.Meter:
        meter = await self.book.register_meter(
            current_identity(), request.meter_id, request.participant_id, request.node_id
        )
        return meter_message(meter)

    async def ListMeters(self, request: pb.ListMetersRequest, context: Any) -> pb.ListMetersResponse:
        meters = await self.book.list_meters(current_identity())
        return pb.ListMetersResponse(meters=[meter_message(m) for m in meters])

    async def PlaceOrder(self, request: pb.PlaceOrderRequest, context: Any) -> pb.OrderReceipt:
        receipt = await self.book.place_order(current_identity(), order_input(request, ""))
        return receipt_message(receipt)

    async def PlaceOrders(self, request: pb.PlaceOrdersRequest, context: Any) -> pb.PlaceOrdersResponse:
        identity = current_identity()
        inputs = [order_input(item, f"orders[{i}].") for i, item in enumerate(request.orders)]
        results = await self.book.place_orders(identity, inputs)
        response = pb.PlaceOrdersResponse()
        add = response.results.add
        for result in results:
            if isinstance(result, DomainError):
                add(error=error_message(result))
            else:
                add(receipt=receipt_message(result))
        return response

    async def AmendOrder(self, request: pb.AmendOrderRequest, context: Any) -> pb.OrderReceipt:
        identity = current_identity()
        if not request.HasField("replacement"):
            raise InvalidArgument("is required", field="replacement")
        receipt = await self.book.amend_order(
            identity, request.order_id, order_input(request.replacement, "replacement.")
        )
        return receipt_message(receipt)

    async def CancelOrder(self, request: pb.CancelOrderRequest, context: Any) -> pb.Order:
        return order_message(await self.book.cancel_order(current_identity(), request.order_id))

    async def GetOrder(self, request: pb.GetOrderRequest, context: Any) -> pb.Order:
        return order_message(await self.book.get_order(current_identity(), request.order_id))

    async def ListOrders(self, request: pb.ListOrdersRequest, context: Any) -> pb.ListOrdersResponse:
        records, token = await self.book.list_orders(
            current_identity(), request.interval_start_s, request.page_size, request.page_token
        )
        return pb.ListOrdersResponse(orders=[order_message(r) for r in records], next_page_token=token)

    async def StreamFills(self, request: pb.StreamFillsRequest, context: Any) -> AsyncIterator[pb.Fill]:
        async for fill in self.book.stream_fills(current_identity(), request.after_fill_seq):
            yield fill_message(fill)

    async def StreamMarketData(
        self, request: pb.StreamMarketDataRequest, context: Any
    ) -> AsyncIterator[pb.MarketData]:
        async for event in self.book.stream_market_data(current_identity()):
            yield market_message(event)
