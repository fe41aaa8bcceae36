"""Settings of the matcher (env prefix P2PGRID_MATCHER_)."""

from dataclasses import dataclass

from services.platform.settings import ServiceSettings, setting

DESCRIPTION = (
    "matcher: clears each delivery interval (welfare-maximising, grid-aware) and publishes one result."
)


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    grid_path: str = setting("", help="the network in the documented YAML form (empty: a single node)")
