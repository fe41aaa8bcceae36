"""Composition root of ledger: builds its adapters and hands them to the platform.

All writes (the two consumers and the periodic settlement) run on one writer
thread, one transaction at a time, so that they never wait on each other's
locks; gRPC reads run on worker threads and never block a writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from nacl.signing import SigningKey

from services.gen.p2pgrid.ledger.v1 import ledger_pb2_grpc as pb_grpc
from services.ledger.adapters.consumers import clearing_consumer, energy_consumer
from services.ledger.adapters.grpc_api import SERVICE_NAME, LedgerServicer
from services.ledger.adapters.keys import LedgerKeyError, load_or_create_signing_key, public_key_hex
from services.ledger.adapters.settler import Settler
from services.ledger.adapters.sql import LedgerStore, migrate_ledger
from services.ledger.settings import PUBLIC_KEY_SUFFIX, Settings
from services.platform.auth import TokenAuthenticator
from services.platform.db import make_engine
from services.platform.outbox import OutboxRelay, migrate_platform_tables
from services.platform.service import ServiceApp, ServiceContext
from services.platform.settings import SettingsError

log = logging.getLogger(__name__)


def load_signing_key(settings: Settings) -> SigningKey:
    """The ledger's key (created if missing) with its public key written next to it as `<file>.pub`."""
    path = settings.signing_key_path()
    try:
        key = load_or_create_signing_key(path)
    except (LedgerKeyError, OSError) as exc:
        raise SettingsError("--signing-key-file", str(exc)) from None
    public = Path(str(path) + PUBLIC_KEY_SUFFIX)
    text = public_key_hex(key) + "\n"
    try:
        if not public.exists() or public.read_text() != text:
            tmp = public.with_name(public.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, public)
    except OSError as exc:
        raise SettingsError("--signing-key-file", f"cannot write the public key {public}: {exc}") from None
    return key


class App:
    """The ledger process: two consumers, the settlement loop, the outbox relay and the gRPC API."""

    def __init__(self, ctx: ServiceContext[Settings]) -> None:
        settings = ctx.settings
        self.ctx = ctx
        self.engine = make_engine(settings.database_url)
        migrate_platform_tables(self.engine)
        migrate_ledger(self.engine)
        key = load_signing_key(settings)
        self.store = LedgerStore(self.engine, key, origin=settings.origin, clock=ctx.clock)
        latest = self.store.latest_checkpoint()
        if latest is not None and latest.public_key != self.store.public_key:
            raise SettingsError(
                "--signing-key-file",
                f"{settings.signing_key_path()} holds key {public_key_hex(key)}, but the ledger's "
                f"checkpoints are signed by {latest.public_key.hex()}",
            )
        if latest is not None and latest.origin != settings.origin:
            raise SettingsError(
                "--origin", f"{settings.origin!r}, but the ledger's checkpoints name {latest.origin!r}"
            )
        ctx.metrics.gauge("p2pgrid_ledger_chain_size").set(latest.tree_size if latest else 0)
        self.writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger-writer")
        self.relay = OutboxRelay(self.engine, ctx.bus, metrics=ctx.metrics)
        self.clearing = clearing_consumer(
            service=ctx.name,
            bus=ctx.bus,
            store=self.store,
            writer=self.writer,
            market_id=settings.market_id,
            metrics=ctx.metrics,
            batch=settings.consumer_batch,
            ack_wait_s=settings.ack_wait_s,
            fault_pause_after_commit_s=settings.fault_pause_after_commit_s,
        )
        self.energy = energy_consumer(
            service=ctx.name,
            bus=ctx.bus,
            store=self.store,
            writer=self.writer,
            market_id=settings.market_id,
            metrics=ctx.metrics,
            batch=settings.consumer_batch,
            ack_wait_s=settings.ack_wait_s,
            fault_pause_after_commit_s=settings.fault_pause_after_commit_s,
        )
        self.settler = Settler(
            store=self.store,
            rules=settings.rules(),
            writer=self.writer,
            clock=ctx.clock,
            metrics=ctx.metrics,
            period_s=settings.settle_period_s,
            on_events=self.relay.notify,
        )
        pb_grpc.add_LedgerServicer_to_server(LedgerServicer(self.store), ctx.grpc.server)
        ctx.grpc.add(SERVICE_NAME)
        ctx.grpc.set_authenticator(
            TokenAuthenticator(
                settings.auth_audience,
                operator_keys=settings.operator_keys(),
                max_lifetime_s=settings.token_max_lifetime_s,
                skew_s=settings.token_clock_skew_s,
            )
        )
        log.info(
            "ledger key",
            extra={"public_key": public_key_hex(key), "key_file": str(settings.signing_key_path())},
        )
        self._relay_stop = asyncio.Event()
        self._workers: list[asyncio.Task[None]] = []
        self._relay_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        ctx = self.ctx
        ctx.spawn(self.relay.run(self._relay_stop), "outbox-relay")
        self._relay_task = ctx.tasks[-1]
        for coro, name in (
            (self.clearing.run(ctx.stop), "clearing-results"),
            (self.energy.run(ctx.stop), "interval-energy"),
            (self.settler.run(ctx.stop), "settlement"),
        ):
            ctx.spawn(coro, name)
            self._workers.append(ctx.tasks[-1])

    async def stop(self) -> None:
        # Let the batch or settlement in progress commit, relay what it announced, then close.
        grace_s = self.ctx.settings.shutdown_grace_s
        if self._workers:
            await asyncio.wait(self._workers, timeout=grace_s)
        self._relay_stop.set()
        if self._relay_task is not None:
            await asyncio.wait([self._relay_task], timeout=grace_s)
        self.writer.shutdown(wait=True)
        self.engine.dispose()


async def build(ctx: ServiceContext[Settings]) -> ServiceApp:
    return App(ctx)
