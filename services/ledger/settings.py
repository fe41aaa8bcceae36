"""Settings of the ledger (env prefix P2PGRID_LEDGER_)."""

from dataclasses import dataclass

from services.platform.settings import ServiceSettings, check_database_url, setting

DESCRIPTION = "ledger: settles each interval exactly once into a tamper-evident double-entry ledger."


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    database_url: str = setting(help="SQLAlchemy URL of the ledger's database", check=check_database_url)
