"""Composition root of order_book: builds its adapters and hands them to the platform."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from services.gen.p2pgrid.orderbook.v1 import order_book_pb2_grpc as pb_grpc
from services.order_book.adapters.auth import CachingTokenAuthenticator
from services.order_book.adapters.clearing import GateKeeper, ResultConsumer
from services.order_book.adapters.grpc_api import SERVICE_NAME, OrderBookServicer
from services.order_book.adapters.store import BookStore, WriteOutcome
from services.order_book.adapters.verifier import SignatureVerifier
from services.order_book.adapters.writer import BookWriter
from services.order_book.book import MarketFeed, OrderBook, ParticipantRegistry, Signal, wait_any
from services.order_book.domain.limits import RateLimiter
from services.order_book.settings import Settings
from services.platform.db import make_engine
from services.platform.outbox import OutboxRelay
from services.platform.service import ServiceApp, ServiceContext

log = logging.getLogger(__name__)
RECENT_INTERVALS = 16


class App:
    """The order book process: writer, outbox relay, gate closure, result consumer and the gRPC API."""

    def __init__(self, ctx: ServiceContext[Settings]) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.rules = settings.market_rules()
        self.engine = make_engine(settings.database_url, pool_size=8, max_overflow=8)
        self.store = BookStore(self.engine, self.rules, publish_order_events=settings.publish_order_events)
        self.store.migrate()
        self.store.hold_writer_lock()
        self.state = self.store.open_book(self.rules.first_open_start_s(ctx.clock.now_s()))
        metrics = ctx.metrics
        self._accepted = metrics.counter("p2pgrid_orders_accepted_total")
        self._rejected = metrics.counter("p2pgrid_orders_rejected_total")
        self._closures = metrics.counter("p2pgrid_gate_closures_total")
        self._fills = metrics.counter("p2pgrid_fills_total")
        self._outbox_pending = metrics.gauge("p2pgrid_outbox_pending")
        self._live = metrics.gauge("p2pgrid_orders_live")
        for start_s, count in self.store.live_orders_by_interval().items():
            self._live.labels(interval=str(start_s)).set(count)
        self.relay = OutboxRelay(self.engine, ctx.bus, metrics=metrics)
        self.writer = BookWriter(
            self.store, ctx.clock, max_orders=settings.write_batch_max_orders, on_commit=self._on_commit
        )
        self.verifier = SignatureVerifier(settings.verify_threads)
        self.feed = MarketFeed()
        self.feed.publish(self.store.recent_interval_events(RECENT_INTERVALS))
        self.fills_signal = Signal()
        self.registry = ParticipantRegistry(self.store.load_participants())
        operator_keys = settings.operator_keys()
        self.book = OrderBook(
            rules=self.rules,
            store=self.store,
            writer=self.writer,
            verifier=self.verifier,
            limiter=RateLimiter(settings.rate_limit_orders_per_s, settings.rate_limit_burst),
            registry=self.registry,
            clock=ctx.clock,
            feed=self.feed,
            fills_signal=self.fills_signal,
            stop=ctx.stop,
            operator_keys=operator_keys,
            open_registration=settings.open_registration,
            max_batch_orders=settings.max_batch_orders,
            on_rejected=lambda code, n: self._rejected.labels(code=code).inc(n),
        )
        first_s = (
            self.state.last_frozen_start_s + self.rules.interval_s
            if self.state.last_frozen_start_s is not None
            else self.state.first_interval_start_s
        )
        self.gate = GateKeeper(self.rules, ctx.clock, self.writer, first_s)
        self.results = ResultConsumer(
            ctx.bus,
            self.store,
            self.feed,
            self.fills_signal,
            metrics,
            durable=f"{ctx.name}-clearing-results",
            on_fills=lambda n: self._fills.inc(n),
        )
        pb_grpc.add_OrderBookServicer_to_server(OrderBookServicer(self.book), ctx.grpc.server)
        ctx.grpc.add(SERVICE_NAME)
        ctx.grpc.set_authenticator(
            CachingTokenAuthenticator(
                settings.auth_audience,
                is_registered=self.registry.__contains__,
                operator_keys=operator_keys,
                max_lifetime_s=settings.token_max_lifetime_s,
                skew_s=settings.token_clock_skew_s,
            )
        )
        self._relay_stop = asyncio.Event()
        self._writer_task: asyncio.Task[None] | None = None
        self._relay_task: asyncio.Task[None] | None = None

    def _on_commit(self, outcome: WriteOutcome) -> None:
        for side, count in outcome.placed.items():
            if count:
                self._accepted.labels(side=side.name.lower()).inc(count)
        for start_s, change in outcome.live_delta.items():
            self._live.labels(interval=str(start_s)).inc(change)
        if outcome.closed:
            self._closures.inc(len(outcome.closed))
            self.feed.publish(outcome.closed)
            for closed in outcome.closed:
                # A closed interval has no live orders any more.
                with contextlib.suppress(KeyError):
                    self._live.remove(str(closed.interval_start_s))
                log.info(
                    "gate closed",
                    extra={
                        "interval": closed.interval_start_s,
                        "book_seq_max": closed.book_seq_max,
                        "orders": closed.orders,
                    },
                )
        if outcome.outbox_events:
            self.relay.notify()

    async def _watch_outbox(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            pending = await asyncio.to_thread(self.relay.pending_count)
            self._outbox_pending.labels(service=self.ctx.name).set(pending)
            await wait_any(stop, timeout_s=5.0)

    async def start(self) -> None:
        ctx = self.ctx
        ctx.spawn(self.writer.run(), "order-book-writer")
        self._writer_task = ctx.tasks[-1]
        ctx.spawn(self.relay.run(self._relay_stop), "outbox-relay")
        self._relay_task = ctx.tasks[-1]
        ctx.spawn(self.gate.run(ctx.stop), "gate-closure")
        ctx.spawn(self.results.run(ctx.stop), "clearing-results")
        ctx.spawn(self._watch_outbox(ctx.stop), "outbox-gauge")

    async def stop(self) -> None:
        # In-flight calls have finished (or timed out): store what is queued, relay it, then close.
        grace_s = self.ctx.settings.shutdown_grace_s
        self.writer.close()
        if self._writer_task is not None:
            await asyncio.wait([self._writer_task], timeout=grace_s)
        self._relay_stop.set()
        if self._relay_task is not None:
            await asyncio.wait([self._relay_task], timeout=grace_s)
        self.verifier.close()
        self.store.release_writer_lock()
        self.engine.dispose()


async def build(ctx: ServiceContext[Settings]) -> ServiceApp:
    return App(ctx)
