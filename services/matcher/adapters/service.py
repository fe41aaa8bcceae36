"""The matcher's adapters: the JetStream consumer of clearing requests and the gRPC `Matcher.Clear`.

One result per interval: the clearing is deterministic and the result is
published with `Nats-Msg-Id` = `clearing-result-<interval start>`, so a
redelivered request (after a crash between publishing and acking) yields the
same bytes under the same id, which the stream drops as a duplicate.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import yaml

from services.domain.errors import InvalidArgument
from services.domain.grid import ConsistencyError, Grid, grid_from_dict
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.gen.p2pgrid.matcher.v1 import matcher_pb2, matcher_pb2_grpc
from services.matcher.adapters.convert import clearing_input, result_message
from services.matcher.adapters.limits import LimitSource, with_limits
from services.matcher.domain.clearing import clear
from services.matcher.domain.orders import OrderError
from services.platform.metrics import Metrics
from services.platform.nats_bus import NatsBus
from services.platform.subjects import CLEARING_REQUEST, CLEARING_RESULT, keyed

log = logging.getLogger(__name__)

DURABLE = "matcher-clearing"


def result_event_id(interval_start_s: int) -> str:
    return f"clearing-result-{interval_start_s}"


class Clearing:
    """Clears one interval from its protobuf request and records the market metrics."""

    def __init__(self, grid: Grid, metrics: Metrics) -> None:
        self.grid = grid
        self.metrics = metrics

    def run(
        self,
        orders: list[common_pb2.ClearingOrder],
        interval: common_pb2.Interval,
        book_seq_max: int,
        grid: Grid,
        *,
        record: bool,
    ) -> common_pb2.ClearingResult:
        request = clearing_input(orders, grid)
        try:
            result = clear(request, grid)
        except OrderError as exc:
            raise InvalidArgument(exc.rule, field=exc.where) from None
        message = result_message(result, grid, interval, book_seq_max)
        if record:
            self._record(message)
        return message

    def _record(self, message: common_pb2.ClearingResult) -> None:
        metrics = self.metrics
        metrics.histogram("p2pgrid_clearing_duration_seconds").observe(message.stats.clear_s)
        metrics.gauge("p2pgrid_clearing_orders").set(message.stats.n_orders)
        metrics.gauge("p2pgrid_clearing_volume_wh").set(sum(t.energy_wh for t in message.trades))
        metrics.gauge("p2pgrid_clearing_welfare_nano").set(message.welfare_nano)
        for node in message.nodes:
            metrics.gauge("p2pgrid_node_price_micro_per_kwh").labels(node=node.node_id).set(
                node.price_micro_per_kwh
            )
        for line in message.lines:
            metrics.gauge("p2pgrid_line_binding").labels(line=line.line_id).set(1 if line.binding else 0)
        metrics.counter("p2pgrid_intervals_cleared_total").inc()


class ClearingConsumer:
    """Takes each clearing request from JetStream, clears it against grid_check's limits, publishes the result."""

    def __init__(self, bus: NatsBus, clearing: Clearing, limits: LimitSource, *, ack_wait_s: float) -> None:
        self.bus = bus
        self.clearing = clearing
        self.limits = limits
        self.ack_wait_s = ack_wait_s

    async def run(self, stop: asyncio.Event) -> None:
        async for deliveries in self.bus.pull(
            "CLEARING", DURABLE, f"{CLEARING_REQUEST}.>", batch=1, ack_wait_s=self.ack_wait_s, stop=stop
        ):
            for delivery in deliveries:
                await self.handle(delivery.data)
                await delivery.ack()

    async def handle(self, data: bytes) -> None:
        request = events_pb2.ClearingRequest.FromString(data)
        start_s = int(request.interval.start_s)
        log.info("clearing", extra={"interval_start_s": start_s, "orders": len(request.orders)})
        capacities = await self.limits.capacities_w(start_s, self.clearing.grid)
        if capacities is None:
            log.warning("clearing against the grid file's ratings", extra={"interval_start_s": start_s})
            capacities = {}
        grid = with_limits(self.clearing.grid, capacities)
        try:
            result = await asyncio.to_thread(
                self.clearing.run,
                list(request.orders),
                request.interval,
                request.book_seq_max,
                grid,
                record=True,
            )
        except InvalidArgument as exc:
            # A request the order book should never have sent: clear nothing rather than block the stream.
            log.error("clearing request refused", extra={"interval_start_s": start_s, "error": str(exc)})
            result = common_pb2.ClearingResult(
                interval=request.interval,
                book_seq_max=request.book_seq_max,
                stats=common_pb2.SolverStats(status=f"refused: {exc}"),
            )
        event_id = result_event_id(start_s)
        event = events_pb2.ClearingResultEvent(
            header=events_pb2.EventHeader(
                event_id=event_id, emitted_at_ms=int(time.time() * 1000), producer="matcher"
            ),
            result=result,
        )
        # The header's time differs between redeliveries, so the stream's dedup id, not the bytes, makes it one.
        await self.bus.publish(keyed(CLEARING_RESULT, start_s), event.SerializeToString(), event_id=event_id)
        log.info("cleared", extra={"interval_start_s": start_s, "trades": len(result.trades)})


class MatcherServicer(matcher_pb2_grpc.MatcherServicer):
    """`Clear`: a what-if clearing of the given orders, on the service's grid or one sent with the request."""

    def __init__(self, clearing: Clearing) -> None:
        self.clearing = clearing

    async def Clear(self, request: matcher_pb2.ClearRequest, context: Any) -> common_pb2.ClearingResult:
        grid = self.clearing.grid
        if request.grid_yaml:
            try:
                grid = grid_from_dict(yaml.safe_load(request.grid_yaml))
            except (ConsistencyError, yaml.YAMLError) as exc:
                raise InvalidArgument(str(exc), field="grid_yaml") from None
        return await asyncio.to_thread(
            self.clearing.run, list(request.orders), request.interval, 0, grid, record=False
        )
