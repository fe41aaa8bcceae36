"""Composition root of ledger: builds its adapters and hands them to the platform."""

from services.ledger.settings import Settings
from services.platform.db import make_engine
from services.platform.outbox import migrate_platform_tables
from services.platform.service import ServiceApp, ServiceContext


class App:
    def __init__(self, ctx: ServiceContext[Settings]) -> None:
        self.engine = make_engine(ctx.settings.database_url)
        migrate_platform_tables(self.engine)

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self.engine.dispose()


async def build(ctx: ServiceContext[Settings]) -> ServiceApp:
    return App(ctx)
