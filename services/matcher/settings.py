"""Settings of the matcher (env prefix P2PGRID_MATCHER_)."""

from dataclasses import dataclass

from services.platform.settings import ServiceSettings, check_positive, setting

DESCRIPTION = (
    "matcher: clears each delivery interval (welfare-maximising, grid-aware) and publishes one result."
)


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    grid_path: str = setting("", help="the network in the documented YAML form (empty: a single node n0)")
    limits_timeout_s: float = setting(
        2.0, help="seconds to wait for grid_check's limits per attempt", check=check_positive
    )
    request_ack_wait_s: float = setting(
        30.0, help="seconds before an unacknowledged clearing request is redelivered", check=check_positive
    )
    limits_attempts: int = setting(
        3, help="attempts to get limits before clearing on the file's ratings", check=check_positive
    )
