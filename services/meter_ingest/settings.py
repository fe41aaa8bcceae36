"""Settings of meter_ingest (env prefix P2PGRID_METER_INGEST_)."""

from dataclasses import dataclass

from services.domain.intervals import DEFAULT_INTERVAL_S
from services.platform.settings import ServiceSettings, check_database_url, check_positive, setting

DESCRIPTION = (
    "meter_ingest: polls Modbus meters and accepts pushed readings, validates them, derives interval energy."
)


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    database_url: str = setting(help="SQLAlchemy URL of meter_ingest's database", check=check_database_url)
    interval_s: int = setting(DEFAULT_INTERVAL_S, help="length of a delivery interval", check=check_positive)
