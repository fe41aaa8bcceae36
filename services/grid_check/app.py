"""Composition root of grid_check: builds the flow model, the limit book, the live view and their adapters."""

from __future__ import annotations

import asyncio

from services.domain.credentials import GRID_CHECK_AUDIENCE
from services.gen.p2pgrid.gridcheck.v1 import grid_check_pb2_grpc as pb_grpc
from services.grid_check.adapters.grpc_api import SERVICE_NAME, GridCheckAuthenticator, GridCheckServicer
from services.grid_check.adapters.limit_store import LimitBook, LimitStore, migrate_grid_check_tables
from services.grid_check.adapters.live_view import LiveView
from services.grid_check.adapters.nats_handlers import LimitResponder, VerdictPublisher
from services.grid_check.domain.gridfile import flow_model_of
from services.grid_check.settings import Settings
from services.platform.auth import TokenAuthenticator
from services.platform.db import make_engine
from services.platform.outbox import OutboxRelay, migrate_platform_tables
from services.platform.service import ServiceApp, ServiceContext


class App:
    """grid_check's own work, started once gRPC serves and stopped after it stops accepting calls."""

    def __init__(self, ctx: ServiceContext[Settings]) -> None:
        settings = ctx.settings
        self.ctx = ctx
        grid = settings.load_grid()
        self.model = flow_model_of(grid)
        self.engine = make_engine(settings.database_url)
        migrate_platform_tables(self.engine)
        migrate_grid_check_tables(self.engine)
        self.book = LimitBook(
            LimitStore(self.engine),
            ratings_w=self.model.ratings_w,
            clock=ctx.clock,
            interval_s=settings.interval_s,
            gate_closure_s=settings.gate_closure_s,
        )
        self.book.load()
        self.live = LiveView(
            model=self.model,
            meter_nodes=settings.meter_nodes(grid),
            book=self.book,
            clock=ctx.clock,
            metrics=ctx.metrics,
            bus=ctx.bus,
            interval_s=settings.interval_s,
            stale_after_s=settings.stale_after_s,
            publish_interval_s=settings.live_publish_interval_s,
            producer=ctx.name,
        )
        self.relay = OutboxRelay(self.engine, ctx.bus, metrics=ctx.metrics)
        self.verdicts = VerdictPublisher(
            bus=ctx.bus,
            engine=self.engine,
            model=self.model,
            book=self.book,
            metrics=ctx.metrics,
            relay=self.relay,
            durable=f"{ctx.name}-verdicts",
            producer=ctx.name,
            default_interval_s=settings.interval_s,
        )
        self.limits = LimitResponder(ctx.bus, self.book, queue=ctx.name)
        servicer = GridCheckServicer(
            grid=grid, model=self.model, book=self.book, live=self.live, interval_s=settings.interval_s
        )
        pb_grpc.add_GridCheckServicer_to_server(servicer, ctx.grpc.server)
        ctx.grpc.add(SERVICE_NAME)
        ctx.grpc.set_authenticator(
            GridCheckAuthenticator(
                TokenAuthenticator(
                    GRID_CHECK_AUDIENCE,
                    operator_keys=settings.operator_key_set(),
                    max_lifetime_s=settings.token_max_lifetime_s,
                    skew_s=settings.token_clock_skew_s,
                ),
                public_reads=settings.public_reads,
            )
        )
        # Background work stops on its own event, set before the bus drains.
        self._stop = asyncio.Event()
        ctx.log.info(
            "grid loaded",
            extra={
                "nodes": len(self.model.node_ids),
                "lines": len(self.model.line_ids),
                "meters": len(self.live.meter_nodes),
                "limit_changes": len(self.book.schedule.changes),
            },
        )

    async def start(self) -> None:
        await self.limits.start()
        await self.live.subscribe()
        self.ctx.spawn(self.relay.run(self._stop), "outbox-relay")
        self.ctx.spawn(self.verdicts.run(self._stop), "clearing-verdicts")
        self.ctx.spawn(self.live.run(self._stop), "live-view")

    async def stop(self) -> None:
        self._stop.set()
        await self.live.unsubscribe()
        pending = [task for task in self.ctx.tasks if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.ctx.settings.shutdown_grace_s)
        self.engine.dispose()


async def build(ctx: ServiceContext[Settings]) -> ServiceApp:
    return App(ctx)
