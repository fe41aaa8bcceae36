"""Loading the meters configuration file with the register map of every meter (the file-reading edge).

The rules are in `domain/meter_config.py`; this module reads the YAML, loads
each meter's map from the maps directory once per model, and checks what
needs the maps (unit ids on a shared connection default to the map's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

from services.meter_ingest.domain.meter_config import (
    MeterConfig,
    MeterConfigError,
    ModbusSource,
    parse_meters_config,
)
from services.meter_ingest.domain.register_map import RegisterMap, RegisterMapError
from services.meter_ingest.maps import MAPS_DIR, load_register_map


@dataclass(frozen=True, slots=True)
class ConfiguredMeter:
    """One configured meter with its register map."""

    config: MeterConfig
    register_map: RegisterMap

    @property
    def meter_id(self) -> str:
        return self.config.meter_id

    @property
    def unit(self) -> int | None:
        """The Modbus unit id (the map's default when the file gives none); None for push meters."""
        source = self.config.source
        if not isinstance(source, ModbusSource):
            return None
        return self.register_map.transport.unit_id if source.unit is None else source.unit


def load_meters(path: str | Path, maps_dir: str | Path | None = None) -> list[ConfiguredMeter]:
    """The checked meters of `path`; raises MeterConfigError naming the file, the entry and the field."""
    source = Path(path)
    directory = Path(maps_dir) if maps_dir else MAPS_DIR
    try:
        text = source.read_text(encoding="utf-8")
    except OSError as exc:
        raise MeterConfigError(f"{source}: cannot read: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise MeterConfigError(f"{source}: not valid YAML: {exc}") from None
    try:
        configs = parse_meters_config(data)
    except MeterConfigError as exc:
        raise MeterConfigError(f"{source}: {exc}") from None
    maps: dict[str, RegisterMap] = {}
    meters: list[ConfiguredMeter] = []
    for index, config in enumerate(configs):
        rmap = maps.get(config.map_name)
        if rmap is None:
            map_path = directory / f"{config.map_name}.yaml"
            if not map_path.is_file():
                raise MeterConfigError(
                    f"{source}: meters[{index}].map: no register map {config.map_name!r} in {directory}"
                )
            try:
                rmap = maps[config.map_name] = load_register_map(map_path)
            except RegisterMapError as exc:
                raise MeterConfigError(f"{source}: meters[{index}].map: {exc}") from None
        meters.append(ConfiguredMeter(config, rmap))
    _check_units(source, meters)
    return meters


def _check_units(source: Path, meters: list[ConfiguredMeter]) -> None:
    used: dict[tuple[str, int, int], str] = {}
    for meter in meters:
        modbus = meter.config.source
        unit = meter.unit
        if not isinstance(modbus, ModbusSource) or unit is None:
            continue
        key = (modbus.host, modbus.port, unit)
        if key in used:
            raise MeterConfigError(
                f"{source}: meter {meter.meter_id!r}: modbus.unit {unit} on {modbus.host}:{modbus.port} is "
                f"taken by meter {used[key]!r} (a unit without one in the file is the map's default)"
            )
        used[key] = meter.meter_id
