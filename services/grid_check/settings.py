"""Settings of grid_check (env prefix P2PGRID_GRID_CHECK_), checked at start so a bad file fails fast."""

from __future__ import annotations

from dataclasses import dataclass

from services.domain.grid import ConsistencyError, Grid, grid_from_dict, load_grid
from services.domain.intervals import DEFAULT_GATE_CLOSURE_S, DEFAULT_INTERVAL_S
from services.grid_check.domain.live import DEFAULT_STALE_AFTER_S
from services.grid_check.domain.meters import MeterMapError, load_meter_map
from services.platform.auth import parse_operator_keys
from services.platform.settings import (
    ServiceSettings,
    SettingsError,
    check_database_url,
    check_positive,
    setting,
)

DESCRIPTION = "grid_check: the network model, line limits per interval, checks of schedules and live flows."

# The network when no grid file is given: one node, no lines, nothing to limit.
SINGLE_NODE_ID = "n0"
SECONDS_PER_MINUTE = 60


def _check_operator_keys(value: str) -> None:
    for position, item in enumerate(part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            parse_operator_keys(item)
        except ValueError as exc:
            raise ValueError(f"key {position + 1} ({item[:16]!r}): {exc}") from None


def _check_non_negative(value: float) -> None:
    if value < 0:
        raise ValueError(f"{value} must be >= 0")


@dataclass(frozen=True, kw_only=True)
class Settings(ServiceSettings):
    database_url: str = setting(help="SQLAlchemy URL of grid_check's database", check=check_database_url)
    grid_path: str = setting(
        "", help=f"the network in the documented YAML form (empty: a single node {SINGLE_NODE_ID!r})"
    )
    operator_keys: str = setting(
        "",
        help="comma-separated base64url Ed25519 public keys of grid operators (the only callers of SetLimits)",
        check=_check_operator_keys,
    )
    meters_path: str = setting(
        "",
        help="meter map: CSV with header meter_id,node_id (.csv) or YAML `meters: [{meter_id, node_id}]`; "
        "readings of meters not in it are ignored by the live view",
    )
    interval_s: int = setting(
        DEFAULT_INTERVAL_S,
        help="length of a delivery interval; must equal the grid file's interval_minutes",
        check=check_positive,
    )
    gate_closure_s: int = setting(
        DEFAULT_GATE_CLOSURE_S,
        help="gate closure lead before an interval starts; limits can be set only before it",
        check=_check_non_negative,
    )
    live_publish_interval_s: float = setting(
        1.0,
        help="at most one LiveLoading event per this many seconds, when the live view changed "
        "(the gauges follow new readings at once)",
        check=check_positive,
    )
    stale_after_s: float = setting(
        DEFAULT_STALE_AFTER_S,
        help="a meter's reading older than this no longer counts in the live view",
        check=check_positive,
    )
    public_reads: bool = setting(
        True,
        help="read calls (GetNetwork, GetLimits, CheckSchedule, GetLiveState) need no call token; "
        "a token that is sent is still verified",
    )
    token_max_lifetime_s: int = setting(3600, help="longest accepted token lifetime", check=check_positive)
    token_clock_skew_s: float = setting(
        30.0, help="tolerated wall-clock difference for tokens", check=_check_non_negative
    )

    def __post_init__(self) -> None:
        grid = self.load_grid()
        if grid.interval_s != self.interval_s:
            raise SettingsError(
                "--interval-s",
                f"{self.interval_s} s differs from the grid file's interval_minutes "
                f"({grid.interval_minutes} min = {grid.interval_s} s)",
            )
        self.meter_nodes(grid)

    def load_grid(self) -> Grid:
        """The validated grid of `grid_path`, or the single-node grid; raises SettingsError naming --grid-path."""
        if not self.grid_path:
            if self.interval_s % SECONDS_PER_MINUTE != 0:
                raise SettingsError("--interval-s", f"{self.interval_s} is not a whole number of minutes")
            return grid_from_dict(
                {
                    "interval_minutes": self.interval_s // SECONDS_PER_MINUTE,
                    "price_tick_micro_per_kwh": 100,
                    "slack": SINGLE_NODE_ID,
                    "nodes": [{"id": SINGLE_NODE_ID}],
                    "lines": [],
                }
            )
        try:
            return load_grid(self.grid_path)
        except FileNotFoundError:
            raise SettingsError("--grid-path", f"{self.grid_path} does not exist") from None
        except (OSError, ConsistencyError, ValueError) as exc:
            raise SettingsError("--grid-path", f"{self.grid_path}: {exc}") from None

    def meter_nodes(self, grid: Grid) -> dict[str, str]:
        """Meter id → node id from `meters_path` (empty without one); raises SettingsError naming --meters-path."""
        if not self.meters_path:
            return {}
        nodes = set(grid.node_ids)
        try:
            return load_meter_map(self.meters_path, is_node=nodes.__contains__)
        except MeterMapError as exc:
            raise SettingsError("--meters-path", str(exc)) from None

    def operator_key_set(self) -> frozenset[bytes]:
        return parse_operator_keys(self.operator_keys)
