"""The meters configuration: which meters the service ingests, whom they belong to, and how their readings arrive.

One YAML file (setting `meters_path`) with a single top-level key `meters`,
so grid_check can read the same file as its meter map (it takes `meter_id`
and `node_id` and ignores the rest)::

    meters:
      - meter_id: m-0001
        participant_id: p3f2c...        # who is settled for this meter's energy
        node_id: n3                     # the grid node the meter measures
        map: eastron_sdm630_v2          # register map: a model id in the maps directory
        modbus: {host: 10.0.4.7, port: 502, unit: 1, framer: socket, poll_interval_s: 5}
      - meter_id: m-0002
        participant_id: p9a41...
        node_id: n3
        map: eastron_sdm120
        push: {public_keys: [<base64url Ed25519 public key>, ...]}

Each meter has exactly one source. `modbus`: `host`, `port` (default 502),
`unit` (default: the map's), `framer` (`socket` = Modbus TCP, `rtu` = RTU over
TCP; default socket), `poll_interval_s` (wall-clock seconds, default 5),
`timeout_s` (default: the map's). Meters with the same host and port share one
connection and must use the same framer and different units. `push`:
`public_keys`, the keys whose call tokens may push this meter's readings. A
meter's own key, a gateway's key listed on each meter behind it, or both: the
caller's participant id (derived from the token's key) decides which meters
it may push. For a push meter the map gives the plausibility limits.

Parsing is pure: `parse_meters_config(data)` takes the YAML data and returns
checked `MeterConfig` rows, or raises `MeterConfigError` naming the entry and
the field that breaks a rule.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from services.domain.credentials import from_b64url, is_valid_public_key
from services.domain.ids import participant_id_from_public_key

Framer = Literal["socket", "rtu"]
FRAMERS: tuple[Framer, ...] = ("socket", "rtu")
DEFAULT_MODBUS_PORT = 502
DEFAULT_POLL_INTERVAL_S = 5.0
# Ids travel in metric labels and logs: printable, no spaces, bounded.
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@/-]{0,127}")
_MAP_NAME = re.compile(r"[a-z0-9_]{1,64}")
_METER_FIELDS = {"meter_id", "participant_id", "node_id", "map", "modbus", "push"}
_MODBUS_FIELDS = {"host", "port", "unit", "framer", "poll_interval_s", "timeout_s"}
_PUSH_FIELDS = {"public_keys"}


class MeterConfigError(ValueError):
    """A meters configuration that breaks a rule; the message names the entry and the field."""


@dataclass(frozen=True, slots=True)
class ModbusSource:
    """Polled over Modbus TCP or RTU over TCP."""

    host: str
    port: int = DEFAULT_MODBUS_PORT
    unit: int | None = None
    framer: Framer = "socket"
    poll_interval_s: float = DEFAULT_POLL_INTERVAL_S
    timeout_s: float | None = None


@dataclass(frozen=True, slots=True)
class PushSource:
    """Readings pushed over gRPC by holders of these Ed25519 keys."""

    public_keys: tuple[bytes, ...]

    @property
    def participant_ids(self) -> tuple[str, ...]:
        return tuple(participant_id_from_public_key(key) for key in self.public_keys)


@dataclass(frozen=True, slots=True)
class MeterConfig:
    meter_id: str
    participant_id: str
    node_id: str
    map_name: str
    source: ModbusSource | PushSource


def parse_meters_config(data: Any) -> list[MeterConfig]:
    """Checked meter rows from parsed YAML (None or `{meters: []}` is no meters)."""
    if data is None:
        return []
    if not isinstance(data, Mapping) or set(data) != {"meters"}:
        keys = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise MeterConfigError(f"the file must be a mapping with the single key 'meters', got {keys}")
    entries = data["meters"]
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise MeterConfigError("meters: must be a list of meter entries")
    meters: list[MeterConfig] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        meter = _meter(entry, f"meters[{index}]")
        if meter.meter_id in seen:
            raise MeterConfigError(
                f"meters[{index}].meter_id: {meter.meter_id!r} is already used by meters[{seen[meter.meter_id]}]"
            )
        seen[meter.meter_id] = index
        meters.append(meter)
    _check_gateways(meters)
    return meters


def push_permissions(meters: list[MeterConfig]) -> dict[str, frozenset[str]]:
    """Participant id of each push key → the meter ids its tokens may push."""
    allowed: dict[str, set[str]] = {}
    for meter in meters:
        if isinstance(meter.source, PushSource):
            for participant_id in meter.source.participant_ids:
                allowed.setdefault(participant_id, set()).add(meter.meter_id)
    return {participant_id: frozenset(ids) for participant_id, ids in allowed.items()}


def _meter(entry: Any, where: str) -> MeterConfig:
    if not isinstance(entry, Mapping):
        raise MeterConfigError(f"{where}: must be a mapping, got {entry!r}")
    unknown = sorted(set(map(str, entry)) - _METER_FIELDS)
    if unknown:
        raise MeterConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_METER_FIELDS)}")
    meter_id = _identifier(entry, "meter_id", where)
    participant_id = _identifier(entry, "participant_id", where)
    node_id = _identifier(entry, "node_id", where)
    map_name = entry.get("map")
    if not isinstance(map_name, str) or not _MAP_NAME.fullmatch(map_name):
        raise MeterConfigError(
            f"{where}.map: must name a register map (lower_snake_case model id), got {map_name!r}"
        )
    has_modbus, has_push = "modbus" in entry, "push" in entry
    if has_modbus == has_push:
        raise MeterConfigError(f"{where}: give exactly one source, 'modbus' or 'push'")
    source: ModbusSource | PushSource
    if has_modbus:
        source = _modbus(entry["modbus"], f"{where}.modbus")
    else:
        source = _push(entry["push"], f"{where}.push")
    return MeterConfig(meter_id, participant_id, node_id, map_name, source)


def _identifier(entry: Mapping[str, Any], name: str, where: str) -> str:
    value = entry.get(name)
    if value is None:
        raise MeterConfigError(f"{where}.{name}: is required")
    text = str(value)
    if not _ID.fullmatch(text):
        raise MeterConfigError(
            f"{where}.{name}: {text!r} must be 1-128 letters, digits or ._:@/- and start with a letter or digit"
        )
    return text


def _modbus(data: Any, where: str) -> ModbusSource:
    if not isinstance(data, Mapping):
        raise MeterConfigError(f"{where}: must be a mapping with host, port, unit, framer, poll_interval_s")
    unknown = sorted(set(map(str, data)) - _MODBUS_FIELDS)
    if unknown:
        raise MeterConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_MODBUS_FIELDS)}")
    host = data.get("host")
    if not isinstance(host, str) or not host.strip() or any(c.isspace() for c in host):
        raise MeterConfigError(f"{where}.host: must be a host name or address, got {host!r}")
    port = _integer(data, "port", where, DEFAULT_MODBUS_PORT, 1, 65535) or DEFAULT_MODBUS_PORT
    unit = _integer(data, "unit", where, None, 0, 255)
    framer = data.get("framer", "socket")
    if framer not in FRAMERS:
        raise MeterConfigError(
            f"{where}.framer: must be 'socket' (Modbus TCP) or 'rtu' (RTU over TCP), got {framer!r}"
        )
    poll_interval_s = _seconds(data, "poll_interval_s", where, DEFAULT_POLL_INTERVAL_S)
    timeout_s = _seconds(data, "timeout_s", where, None)
    assert poll_interval_s is not None
    return ModbusSource(host, port, unit, framer, poll_interval_s, timeout_s)


def _push(data: Any, where: str) -> PushSource:
    if not isinstance(data, Mapping):
        raise MeterConfigError(f"{where}: must be a mapping with public_keys")
    unknown = sorted(set(map(str, data)) - _PUSH_FIELDS)
    if unknown:
        raise MeterConfigError(f"{where}: unknown field(s) {unknown}; allowed: {sorted(_PUSH_FIELDS)}")
    texts = data.get("public_keys")
    if not isinstance(texts, list) or not texts:
        raise MeterConfigError(
            f"{where}.public_keys: must be a non-empty list of base64url Ed25519 public keys"
        )
    keys: list[bytes] = []
    for i, text in enumerate(texts):
        key = _public_key(str(text))
        if key is None:
            raise MeterConfigError(
                f"{where}.public_keys[{i}]: {str(text)[:16]!r} is not a base64url Ed25519 public key (32 bytes)"
            )
        if key not in keys:
            keys.append(key)
    return PushSource(tuple(keys))


@functools.lru_cache(maxsize=4096)
def _public_key(text: str) -> bytes | None:
    """The key a base64url text encodes, None when it is not a valid Ed25519 public key.

    A gateway's key is listed on every meter behind it: it is checked once.
    """
    try:
        key = from_b64url(text)
    except ValueError:
        return None
    return key if is_valid_public_key(key) else None


def _integer(
    data: Mapping[str, Any], name: str, where: str, default: int | None, lo: int, hi: int
) -> int | None:
    value = data.get(name, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise MeterConfigError(f"{where}.{name}: must be an integer {lo}-{hi}, got {value!r}")
    return value


def _seconds(data: Mapping[str, Any], name: str, where: str, default: float | None) -> float | None:
    value = data.get(name, default)
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise MeterConfigError(f"{where}.{name}: must be a positive number of seconds, got {value!r}")
    return float(value)


def _check_gateways(meters: list[MeterConfig]) -> None:
    """Meters behind one host:port share a connection: one framer, distinct units (map default if unset)."""
    framers: dict[tuple[str, int], tuple[str, str]] = {}
    for meter in meters:
        source = meter.source
        if not isinstance(source, ModbusSource):
            continue
        key = (source.host, source.port)
        first = framers.setdefault(key, (source.framer, meter.meter_id))
        if first[0] != source.framer:
            raise MeterConfigError(
                f"meter {meter.meter_id!r}: modbus.framer {source.framer!r} differs from {first[0]!r} of meter "
                f"{first[1]!r} on the same {source.host}:{source.port}"
            )
