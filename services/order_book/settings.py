"""Settings of the order book (env prefix P2PGRID_ORDER_BOOK_)."""

from dataclasses import dataclass

from services.domain.intervals import DEFAULT_GATE_CLOSURE_S, DEFAULT_INTERVAL_S
from services.platform.settings import ServiceSettings, check_database_url, check_positive, setting

DESCRIPTION = "order_book: participants, signed orders, gate closure per interval, and fills."


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    database_url: str = setting(help="SQLAlchemy URL of the order book's database", check=check_database_url)
    interval_s: int = setting(DEFAULT_INTERVAL_S, help="length of a delivery interval", check=check_positive)
    gate_closure_s: int = setting(DEFAULT_GATE_CLOSURE_S, help="gate closure lead before an interval starts")
