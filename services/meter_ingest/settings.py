"""Settings of meter_ingest (env prefix P2PGRID_METER_INGEST_), checked at start so a bad file fails fast."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from services.domain.intervals import DEFAULT_INTERVAL_S
from services.meter_ingest.domain.meter_config import MeterConfigError
from services.meter_ingest.maps import MAPS_DIR
from services.meter_ingest.meters import ConfiguredMeter, load_meters
from services.platform.settings import (
    ServiceSettings,
    SettingsError,
    check_database_url,
    check_positive,
    setting,
)

DESCRIPTION = (
    "meter_ingest: polls Modbus meters and accepts pushed readings, validates them, derives interval energy."
)


def _check_non_negative(value: float) -> None:
    if value < 0:
        raise ValueError(f"{value} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    database_url: str = setting(
        help="SQLAlchemy URL of meter_ingest's database (meter state and the outbox)",
        check=check_database_url,
    )
    meters_path: str = setting(
        "",
        help="the meters configuration (YAML, see services/meter_ingest/README.md); empty: no meters, "
        "so nothing is polled and every push is refused",
    )
    maps_dir: str = setting(
        "", help=f"directory of the register maps the meters name (empty: the repository's {MAPS_DIR.name}/)"
    )
    interval_s: int = setting(DEFAULT_INTERVAL_S, help="length of a delivery interval", check=check_positive)
    metering_delay_s: float = setting(
        60.0,
        help="interval energy is published this long after an interval ends (service clock); meters that "
        "have not reported the interval by then follow in later events",
        check=_check_non_negative,
    )
    max_clock_skew_s: float = setting(
        30.0,
        help="a reading stamped further than this from the service clock is flagged clock_skew and its "
        "counters are not used",
        check=check_positive,
    )
    reading_gap_s: float = setting(
        300.0, help="usable readings further apart than this are flagged gap", check=check_positive
    )
    measured_span_s: float = setting(
        120.0,
        help="an interval boundary between two readings at most this far apart is MEASURED; further apart "
        "(up to 2 h) it is INTERPOLATED, which the ledger settles as estimated",
        check=check_positive,
    )
    readings_per_message: int = setting(
        500, help="at most this many readings in one ReadingsBatch message", check=check_positive
    )
    readings_flush_s: float = setting(
        0.2, help="polled readings wait at most this long (wall clock) to be batched", check=check_positive
    )
    meters_per_energy_message: int = setting(
        500, help="at most this many meters in one IntervalEnergy message", check=check_positive
    )
    checkpoint_interval_s: float = setting(
        5.0,
        help="meter state (counters, interval energy in progress) is saved this often (wall clock) and "
        "with every interval energy published",
        check=check_positive,
    )
    push_in_flight: int = setting(
        8,
        help="per push stream, this many ReadingsBatch publishes may await their acks",
        check=check_positive,
    )
    token_max_lifetime_s: int = setting(
        3600, help="longest accepted call token lifetime", check=check_positive
    )
    token_clock_skew_s: float = setting(
        30.0, help="tolerated wall-clock difference for call tokens", check=_check_non_negative
    )

    def __post_init__(self) -> None:
        if self.maps_dir and not Path(self.maps_dir).is_dir():
            raise SettingsError("--maps-dir", f"{self.maps_dir} is not a directory")
        self.load_meters()

    def load_meters(self) -> list[ConfiguredMeter]:
        """The configured meters (none without a file); raises SettingsError naming --meters-path."""
        if not self.meters_path:
            return []
        try:
            return load_meters(self.meters_path, self.maps_dir or None)
        except MeterConfigError as exc:
            raise SettingsError("--meters-path", str(exc)) from None
