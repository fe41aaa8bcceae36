"""Settings of grid_check (env prefix P2PGRID_GRID_CHECK_)."""

from dataclasses import dataclass

from services.platform.settings import ServiceSettings, check_database_url, setting

DESCRIPTION = "grid_check: the network model, line limits per interval, checks of schedules and live flows."


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    database_url: str = setting(help="SQLAlchemy URL of grid_check's database", check=check_database_url)
    grid_path: str = setting("", help="the network in the documented YAML form (empty: a single node)")
