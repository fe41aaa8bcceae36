"""Translate between the matcher's contracts (protobuf) and its pure clearing types."""

from __future__ import annotations

import numpy as np

from services.domain.errors import InvalidArgument
from services.domain.grid import Grid
from services.gen.p2pgrid.common.v1 import common_pb2
from services.matcher.domain.orders import ClearingInput, Order, OrderError
from services.matcher.domain.result import ClearingResult, result_canonical_bytes

_SIDES = {common_pb2.SIDE_BUY: "buy", common_pb2.SIDE_SELL: "sell"}


def clearing_input(
    orders: list[common_pb2.ClearingOrder], grid: Grid, field: str = "orders"
) -> ClearingInput:
    """The clearing input of protobuf orders; a bad order raises InvalidArgument naming its position and rule."""
    converted = []
    for position, order in enumerate(orders):
        side = _SIDES.get(order.side)
        if side is None:
            raise InvalidArgument("side must be SIDE_BUY or SIDE_SELL", field=f"{field}[{position}].side")
        converted.append(
            Order(
                order_id=order.order_id,
                participant_id=order.participant_id,
                node_id=order.node_id,
                side=side,
                energy_wh=order.energy_wh,
                price_micro_per_kwh=order.price_micro_per_kwh,
                sequence=order.book_seq if order.book_seq else None,
            )
        )
    try:
        return ClearingInput.from_orders(
            converted, grid, labels=[f"{field}[{i}]" for i in range(len(converted))]
        )
    except OrderError as exc:
        raise InvalidArgument(exc.rule, field=exc.where) from None
    except ValueError as exc:
        raise InvalidArgument(str(exc), field=field) from None


def result_message(
    result: ClearingResult,
    grid: Grid,
    interval: common_pb2.Interval,
    book_seq_max: int,
) -> common_pb2.ClearingResult:
    """The protobuf result, with participants and nodes on every trade so consumers need no order lookup."""
    node_ids = grid.node_ids
    # The result's own columns include the utility's standing orders, which the request does not have.
    participants = list(result.participant_ids)
    nodes_of_rows = result.node_index.tolist()
    message = common_pb2.ClearingResult(
        interval=interval,
        book_seq_max=book_seq_max,
        welfare_nano=int(result.welfare_nano),
        congestion_rent_nano=int(result.congestion_rent_nano),
        canonical_json=result_canonical_bytes(result),
        stats=common_pb2.SolverStats(
            clear_s=float(result.timings_s.get("total_s", 0.0)),
            n_orders=len(result.order_ids),
            n_steps=int(result.solver.get("steps", 0)),
            status="optimal",
        ),
    )
    message.nodes.extend(
        common_pb2.NodePrice(node_id=node_id, price_micro_per_kwh=int(price))
        for node_id, price in zip(result.node_ids, result.node_price_micro_per_kwh.tolist(), strict=True)
    )
    message.orders.extend(
        common_pb2.OrderAllocation(order_id=order_id, accepted_wh=int(accepted))
        for order_id, accepted in zip(result.order_ids, result.accepted_wh.tolist(), strict=True)
    )
    message.lines.extend(
        common_pb2.LineFlow(
            line_id=line_id,
            flow_w=int(np.rint(flow)),
            binding=bool(binding),
            shadow_price_micro_per_kwh=int(np.rint(shadow)),
        )
        for line_id, flow, binding, shadow in zip(
            result.line_ids,
            result.flow_w.tolist(),
            result.binding.tolist(),
            result.shadow_price_micro_per_kwh.tolist(),
            strict=True,
        )
    )
    order_ids = list(result.order_ids)
    for buyer, seller, energy in zip(
        result.trade_buyer_row.tolist(),
        result.trade_seller_row.tolist(),
        result.trade_energy_wh.tolist(),
        strict=True,
    ):
        message.trades.append(
            common_pb2.Trade(
                buyer_order_id=order_ids[buyer],
                seller_order_id=order_ids[seller],
                energy_wh=int(energy),
                buyer_participant_id=participants[buyer],
                seller_participant_id=participants[seller],
                buyer_node_id=node_ids[nodes_of_rows[buyer]],
                seller_node_id=node_ids[nodes_of_rows[seller]],
            )
        )
    return message
