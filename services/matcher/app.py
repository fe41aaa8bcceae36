"""Composition root of the matcher: builds its adapters and hands them to the platform."""

from services.matcher.settings import Settings
from services.platform.service import NoApp, ServiceApp, ServiceContext


async def build(ctx: ServiceContext[Settings]) -> ServiceApp:
    # The clearing consumer and the Matcher gRPC service plug in here.
    return NoApp()
