"""Composition root of the matcher: grid, clearing, limit source, consumer and gRPC service."""

from __future__ import annotations

from services.domain.grid import ConsistencyError, Grid, grid_from_dict, load_grid
from services.gen.p2pgrid.matcher.v1 import matcher_pb2_grpc
from services.matcher.adapters.limits import LimitSource
from services.matcher.adapters.service import Clearing, ClearingConsumer, MatcherServicer
from services.matcher.settings import Settings
from services.platform.service import ServiceApp, ServiceContext
from services.platform.settings import SettingsError

SINGLE_NODE = {
    "interval_minutes": 15,
    "price_tick_micro_per_kwh": 100,
    "slack": "n0",
    "nodes": [{"id": "n0"}],
    "lines": [],
}


def load_service_grid(path: str) -> Grid:
    """The configured network, or a single node when none is given; a bad file is a settings error."""
    if not path:
        return grid_from_dict(SINGLE_NODE)
    try:
        return load_grid(path)
    except (OSError, ConsistencyError, ValueError) as exc:
        raise SettingsError("--grid-path", str(exc)) from None


class App:
    def __init__(self, ctx: ServiceContext[Settings]) -> None:
        self.ctx = ctx
        grid = load_service_grid(ctx.settings.grid_path)
        self.clearing = Clearing(grid, ctx.metrics)
        limits = LimitSource(
            ctx.bus, timeout_s=ctx.settings.limits_timeout_s, attempts=ctx.settings.limits_attempts
        )
        self.consumer = ClearingConsumer(
            ctx.bus, self.clearing, limits, ack_wait_s=ctx.settings.request_ack_wait_s
        )
        matcher_pb2_grpc.add_MatcherServicer_to_server(MatcherServicer(self.clearing), ctx.grpc.server)
        ctx.grpc.add("p2pgrid.matcher.v1.Matcher")

    async def start(self) -> None:
        self.ctx.spawn(self.consumer.run(self.ctx.stop), "clearing-consumer")

    async def stop(self) -> None:
        return None


async def build(ctx: ServiceContext[Settings]) -> ServiceApp:
    return App(ctx)
