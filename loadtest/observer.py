"""What the services published during a run: clearing requests and results, and settlement notices.

The load test drives the market only through the public gRPC API; to see
what came of it, it reads the events the services publish: each interval's
ClearingRequest (the order set frozen at gate closure) and
ClearingResultEvent on the CLEARING stream, and the ledger's first
IntervalSettled notice per interval on the LEDGER stream. It reads them with
ordered consumers that start at the moment it connects and leave no state
on the server.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError

from services.gen.p2pgrid.events.v1 import events_pb2
from services.platform.nats_bus import NatsBus
from services.platform.subjects import CLEARING_REQUEST, CLEARING_RESULT, LEDGER_SETTLED


@dataclass
class IntervalSeen:
    """One interval as the services reported it; wall times are Unix seconds."""

    start_s: int
    request_seen_wall_s: float | None = None
    request_orders: int = 0
    # Order ids in the clearing request that belong to this run's participants.
    request_ids_of_run: set[str] = field(default_factory=set)
    result_seen_wall_s: float | None = None
    result_orders: int = 0
    solver_s: float | None = None
    solver_steps: int = 0
    solver_status: str = ""
    volume_wh: int = 0
    trades: int = 0
    settled_wall_s: float | None = None
    settled_transfers: int = 0


class Observer:
    """Follows the CLEARING and LEDGER streams into `intervals`, keyed by interval start."""

    def __init__(self, participants: set[str]) -> None:
        self.participants = participants
        self.intervals: dict[int, IntervalSeen] = {}
        self._bus: NatsBus | None = None
        self._subscriptions: list[Any] = []

    def seen(self, start_s: int) -> IntervalSeen:
        return self.intervals.setdefault(start_s, IntervalSeen(start_s))

    async def start(self, nats_url: str) -> None:
        self._bus = bus = await NatsBus.connect(nats_url, name="p2pgrid-loadtest")
        handlers: list[tuple[str, str, Callable[[Any], Awaitable[None]]]] = [
            ("CLEARING", f"{CLEARING_REQUEST}.>", self._on_request),
            ("CLEARING", f"{CLEARING_RESULT}.>", self._on_result),
            ("LEDGER", f"{LEDGER_SETTLED}.>", self._on_settled),
        ]
        for stream, subject, handler in handlers:
            try:
                subscription = await bus.js.subscribe(
                    subject,
                    stream=stream,
                    cb=handler,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.NEW,
                )
            except NotFoundError:
                await self.stop()
                raise RuntimeError(f"NATS at {nats_url} has no stream {stream}: is it p2pgrid's?") from None
            self._subscriptions.append(subscription)

    async def stop(self) -> None:
        for subscription in self._subscriptions:
            # The connection may already be gone; an ordered consumer leaves nothing behind on the server.
            with contextlib.suppress(Exception):
                await subscription.unsubscribe()
        self._subscriptions.clear()
        if self._bus is not None:
            await self._bus.close()
            self._bus = None

    async def _on_request(self, msg: Any) -> None:
        request = events_pb2.ClearingRequest.FromString(msg.data)
        seen = self.seen(int(request.interval.start_s))
        if seen.request_seen_wall_s is not None:
            return
        seen.request_seen_wall_s = time.time()
        seen.request_orders = len(request.orders)
        ours = self.participants
        seen.request_ids_of_run = {o.order_id for o in request.orders if o.participant_id in ours}

    async def _on_result(self, msg: Any) -> None:
        result = events_pb2.ClearingResultEvent.FromString(msg.data).result
        seen = self.seen(int(result.interval.start_s))
        if seen.result_seen_wall_s is not None:
            return
        seen.result_seen_wall_s = time.time()
        seen.result_orders = len(result.orders)
        seen.solver_s = float(result.stats.clear_s)
        seen.solver_steps = int(result.stats.n_steps)
        seen.solver_status = result.stats.status
        seen.volume_wh = sum(trade.energy_wh for trade in result.trades)
        seen.trades = len(result.trades)

    async def _on_settled(self, msg: Any) -> None:
        settled = events_pb2.IntervalSettled.FromString(msg.data)
        seen = self.seen(int(settled.interval_start_s))
        if seen.settled_wall_s is not None:
            return  # a later revision (corrections) of an interval already settled
        # The ledger stamps the notice with its wall clock when it settles; fall back to when it arrived.
        emitted_ms = int(settled.header.emitted_at_ms)
        seen.settled_wall_s = emitted_ms / 1000 if emitted_ms > 0 else time.time()
        seen.settled_transfers = int(settled.transfers)
