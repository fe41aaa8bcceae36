"""The life of every service process: settings, logging, NATS, gRPC, /metrics, and a graceful stop on SIGTERM.

`run_service` is what each `services/<service>/__main__.py` calls. It loads
the typed settings (exit 2 with one line on any bad value), connects to NATS
(exit 2 if it cannot, naming `--nats-url`), lets the service's composition
root (`app.py`) build its adapters and register its gRPC servicers, serves
until SIGTERM or SIGINT, then stops accepting calls, lets in-flight work
finish, drains NATS and closes the database.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, Protocol, TypeVar

from services.domain.intervals import Clock
from services.platform.grpc_server import GrpcServer
from services.platform.logging import configure_logging
from services.platform.metrics import Metrics, MetricsServer
from services.platform.nats_bus import NatsBus, NatsConnectError
from services.platform.settings import (
    EXIT_SETTINGS,
    ServiceSettings,
    SettingsError,
    exit_on_settings_error,
    load_settings,
)

S = TypeVar("S", bound=ServiceSettings)


@dataclass
class ServiceContext(Generic[S]):
    """Everything the platform hands a service's composition root."""

    name: str
    settings: S
    bus: NatsBus
    clock: Clock
    metrics: Metrics
    log: logging.Logger
    grpc: GrpcServer
    stop: asyncio.Event
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    # Set when a background task failed: the process then exits 1 after its graceful stop.
    failed: bool = False

    def spawn(self, coro: Awaitable[None], name: str) -> None:
        """Run a background task for the life of the service; its failure stops the service."""

        async def _guard() -> None:
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except BaseException:
                self.log.exception("background task %s failed; stopping", name)
                self.failed = True
                self.stop.set()
                raise

        self.tasks.append(asyncio.create_task(_guard(), name=name))


class ServiceApp(Protocol):
    """What a composition root returns: started after gRPC serves, stopped after it stops accepting calls."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class NoApp:
    """A service with nothing of its own to start or stop."""

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None


Build = Callable[[ServiceContext[S]], Awaitable[ServiceApp]]


def run_service(
    name: str,
    settings_cls: type[S],
    build: Build[S],
    *,
    description: str,
    argv: Sequence[str] | None = None,
) -> int:
    """Run one service process to completion and return its exit code."""
    prog = f"python -m services.{name}"
    env_prefix = f"P2PGRID_{name.upper()}_"
    with exit_on_settings_error(prog):
        settings = load_settings(
            settings_cls, prog=prog, env_prefix=env_prefix, description=description, argv=argv
        )
    service = settings.service_name or name
    log = configure_logging(service, settings.log_level, settings.log_format)
    try:
        with exit_on_settings_error(prog):
            return asyncio.run(_serve(service, settings, build, log))
    except KeyboardInterrupt:
        return 0


async def _serve(service: str, settings: S, build: Build[S], log: logging.Logger) -> int:
    try:
        bus = await NatsBus.connect(
            settings.nats_url, name=service, timeout_s=settings.nats_connect_timeout_s
        )
    except NatsConnectError as exc:
        raise SettingsError("--nats-url", str(exc)) from None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    metrics = Metrics(service)
    pending = metrics.gauge("p2pgrid_nats_consumer_pending")
    bus.on_pending = lambda durable, waiting: pending.labels(service=service, consumer=durable).set(waiting)
    grpc_server = GrpcServer(metrics)
    ctx: ServiceContext[S] = ServiceContext(
        name=service,
        settings=settings,
        bus=bus,
        clock=settings.make_clock(),
        metrics=metrics,
        log=log,
        grpc=grpc_server,
        stop=stop,
    )
    metrics_server: MetricsServer | None = None
    app: ServiceApp | None = None
    try:
        await bus.ensure_streams(replicas=settings.nats_stream_replicas)
        app = await build(ctx)
        metrics_server = MetricsServer(metrics, settings.metrics_host, settings.metrics_port)
        grpc_port = await grpc_server.start(settings.grpc_host, settings.grpc_port)
        await app.start()
        metrics.gauge("p2pgrid_service_up").labels(service=service).set(1)
        _write_ready_file(settings.ready_file, grpc_port, metrics_server.port)
        log.info("serving", extra={"grpc_port": grpc_port, "metrics_port": metrics_server.port})
        await stop.wait()
        log.info("stopping")
    finally:
        metrics.gauge("p2pgrid_service_up").labels(service=service).set(0)
        await grpc_server.stop(settings.shutdown_grace_s)
        if app is not None:
            await app.stop()
        for task in ctx.tasks:
            if not task.done():
                task.cancel()
        if ctx.tasks:
            await asyncio.wait(ctx.tasks, timeout=settings.shutdown_grace_s)
        await bus.close()
        if metrics_server is not None:
            metrics_server.close()
    return 1 if ctx.failed else 0


def _write_ready_file(path: str, grpc_port: int, metrics_port: int) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps({"pid": os.getpid(), "grpc_port": grpc_port, "metrics_port": metrics_port}))
    tmp.replace(target)


def main_exit(code: int) -> None:
    sys.exit(code if code in (0, 1, EXIT_SETTINGS) else 1)
