"""Composition root of meter_ingest: the meters, their pipelines, the poller, the push service and the publishers."""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from collections.abc import Awaitable

from services.domain.credentials import METER_INGEST_AUDIENCE
from services.gen.p2pgrid.meteringest.v1 import meter_ingest_pb2_grpc as pb_grpc
from services.meter_ingest.adapters.energy import EnergyPublisher
from services.meter_ingest.adapters.grpc_api import SERVICE_NAME, MeterIngestServicer
from services.meter_ingest.adapters.ingest import Ingestor
from services.meter_ingest.adapters.modbus_poller import GatewayTarget, MeterTarget, ModbusPoller
from services.meter_ingest.adapters.publisher import PollBuffer, ReadingsPublisher
from services.meter_ingest.adapters.state_store import MeterStateStore, migrate_meter_ingest_tables
from services.meter_ingest.domain.interval_energy import EnergyRules
from services.meter_ingest.domain.meter_config import ModbusSource
from services.meter_ingest.domain.readings import MeterReading, MeterStatus
from services.meter_ingest.domain.vee import VeeSettings
from services.meter_ingest.meters import ConfiguredMeter
from services.meter_ingest.settings import Settings
from services.platform.auth import TokenAuthenticator
from services.platform.db import make_engine
from services.platform.outbox import OutboxRelay, migrate_platform_tables
from services.platform.service import ServiceApp, ServiceContext

# How often (wall clock) the per-meter gauges are refreshed.
OBSERVE_EVERY_S = 1.0


def gateway_targets(meters: list[ConfiguredMeter]) -> list[GatewayTarget]:
    """One connection per host and port, with the Modbus meters behind it."""
    groups: dict[tuple[str, int], list[tuple[ConfiguredMeter, ModbusSource]]] = defaultdict(list)
    for meter in meters:
        source = meter.config.source
        if isinstance(source, ModbusSource):
            groups[(source.host, source.port)].append((meter, source))
    targets = []
    for (host, port), group in groups.items():
        timeouts = [source.timeout_s for _, source in group if source.timeout_s is not None]
        targets.append(
            GatewayTarget(
                host,
                port,
                tuple(
                    MeterTarget(m.meter_id, m.register_map, unit_id=m.unit, poll_interval_s=s.poll_interval_s)
                    for m, s in group
                ),
                # The file's check made every meter on one host and port use the same framer.
                framer=group[0][1].framer,
                timeout_s=max(timeouts) if timeouts else None,
            )
        )
    return targets


class App:
    """meter_ingest's own work, started once gRPC serves and stopped after it stops accepting calls."""

    def __init__(self, ctx: ServiceContext[Settings]) -> None:
        settings = ctx.settings
        self.ctx = ctx
        meters = settings.load_meters()
        self.engine = make_engine(settings.database_url)
        migrate_platform_tables(self.engine)
        migrate_meter_ingest_tables(self.engine)
        self.store = MeterStateStore(self.engine)
        self.ingestor = Ingestor(
            meters,
            interval_s=settings.interval_s,
            vee=VeeSettings(max_clock_skew_s=settings.max_clock_skew_s, gap_s=settings.reading_gap_s),
            energy_rules=EnergyRules(measured_span_s=settings.measured_span_s),
            clock=ctx.clock,
            metrics=ctx.metrics,
        )
        restored = self.ingestor.restore(self.store.load(settings.interval_s))
        self.relay = OutboxRelay(self.engine, ctx.bus, metrics=ctx.metrics)
        self.publisher = ReadingsPublisher(
            ctx.bus, producer=ctx.name, per_message=settings.readings_per_message, metrics=ctx.metrics
        )
        self.poll_buffer = PollBuffer(self.publisher, flush_s=settings.readings_flush_s)
        targets = gateway_targets(meters)
        self.poller = ModbusPoller(targets, self._on_polled, clock=ctx.clock) if targets else None
        self.energy = EnergyPublisher(
            self.ingestor,
            self.store,
            self.relay,
            ctx.clock,
            ctx.metrics,
            metering_delay_s=settings.metering_delay_s,
            per_message=settings.meters_per_energy_message,
            checkpoint_s=settings.checkpoint_interval_s,
            producer=ctx.name,
        )
        servicer = MeterIngestServicer(self.ingestor, self.publisher, in_flight=settings.push_in_flight)
        pb_grpc.add_MeterIngestServicer_to_server(servicer, ctx.grpc.server)
        ctx.grpc.add(SERVICE_NAME)
        permissions = self.ingestor.permissions
        ctx.grpc.set_authenticator(
            TokenAuthenticator(
                METER_INGEST_AUDIENCE,
                max_lifetime_s=settings.token_max_lifetime_s,
                skew_s=settings.token_clock_skew_s,
                is_known=permissions.__contains__,
            )
        )
        # Ingestion stops first (its last state and events are saved), then the relay publishes what is left.
        self._stop_ingest = asyncio.Event()
        self._stop_relay = asyncio.Event()
        self._ingest_tasks: list[asyncio.Task[None]] = []
        self._relay_task: asyncio.Task[None] | None = None
        ctx.log.info(
            "meters loaded",
            extra={
                "meters": len(meters),
                "polled": sum(1 for m in meters if m.unit is not None),
                "pushed": sum(1 for m in meters if m.unit is None),
                "gateways": len(targets),
                "restored": restored,
            },
        )

    async def _on_polled(self, reading: MeterReading) -> None:
        message = self.ingestor.accept_polled(reading)
        if message is not None:
            self.poll_buffer.add(message)

    async def _observe(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            offline = {}
            if self.poller is not None:
                offline = {
                    meter_id: state.status is MeterStatus.OFFLINE
                    for meter_id, state in self.poller.states().items()
                }
            self.ingestor.observe(self.ctx.clock.now_s(), offline)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=OBSERVE_EVERY_S)

    def _spawn(self, coro: Awaitable[None], name: str) -> asyncio.Task[None]:
        self.ctx.spawn(coro, name)
        return self.ctx.tasks[-1]

    async def start(self) -> None:
        self._relay_task = self._spawn(self.relay.run(self._stop_relay), "outbox-relay")
        self._ingest_tasks = [
            self._spawn(self.poll_buffer.run(self._stop_ingest), "poll-buffer"),
            self._spawn(self.energy.run(self._stop_ingest), "interval-energy"),
            self._spawn(self._observe(self._stop_ingest), "meter-gauges"),
        ]
        if self.poller is not None:
            # A gateway task that fails stops the poller, and the service with it (loudly, not silently).
            self._spawn(self.poller.run(), "modbus-poller")

    async def stop(self) -> None:
        if self.poller is not None:
            await self.poller.stop()
        grace_s = self.ctx.settings.shutdown_grace_s
        self._stop_ingest.set()
        pending = [task for task in self._ingest_tasks if not task.done()]
        if pending:
            await asyncio.wait(pending, timeout=grace_s)
        self._stop_relay.set()
        if self._relay_task is not None and not self._relay_task.done():
            await asyncio.wait([self._relay_task], timeout=grace_s)
        self.engine.dispose()


async def build(ctx: ServiceContext[Settings]) -> ServiceApp:
    return App(ctx)
