"""The meters configuration file: what it accepts, the errors that name entry and field, and who may push what."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import yaml

from services.domain.credentials import b64url
from services.domain.ids import participant_id_from_public_key
from services.grid_check.domain.meters import parse_meter_map_yaml
from services.meter_ingest.domain.meter_config import (
    MeterConfigError,
    ModbusSource,
    PushSource,
    parse_meters_config,
    push_permissions,
)
from services.meter_ingest.meters import load_meters
from services.meter_ingest.settings import Settings
from services.platform.settings import SettingsError, load_settings


def _key() -> tuple[str, str]:
    """(base64url public key, participant id) of a fresh key."""
    public = bytes(nacl.signing.SigningKey.generate().verify_key)
    return b64url(public), participant_id_from_public_key(public)


def _modbus(meter_id: str, unit: int | None = 1, **extra: Any) -> dict[str, Any]:
    modbus: dict[str, Any] = {"host": "10.0.0.5", "port": 502, **extra}
    if unit is not None:
        modbus["unit"] = unit
    return {
        "meter_id": meter_id,
        "participant_id": "p-1",
        "node_id": "n1",
        "map": "eastron_sdm630_v2",
        "modbus": modbus,
    }


def _push(meter_id: str, *keys: str) -> dict[str, Any]:
    return {
        "meter_id": meter_id,
        "participant_id": "p-2",
        "node_id": "n2",
        "map": "eastron_sdm120",
        "push": {"public_keys": list(keys)},
    }


def test_a_modbus_and_a_push_meter_are_read_with_their_defaults() -> None:
    key, _pid = _key()
    modbus_entry = _modbus("m-1", unit=None)
    modbus_entry["modbus"] = {"host": "meter-gw.local"}
    meters = parse_meters_config({"meters": [modbus_entry, _push("m-2", key)]})
    assert meters[0].source == ModbusSource("meter-gw.local", 502, None, "socket", 5.0, None)
    assert isinstance(meters[1].source, PushSource) and len(meters[1].source.public_keys) == 1
    assert (meters[1].participant_id, meters[1].node_id, meters[1].map_name) == (
        "p-2",
        "n2",
        "eastron_sdm120",
    )


def test_an_empty_file_means_no_meters() -> None:
    assert parse_meters_config(None) == []
    assert parse_meters_config({"meters": None}) == []


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({**_modbus("m-1"), "participant_id": None}, "meters[0].participant_id: is required"),
        ({**_modbus("m-1"), "node_id": "two words"}, "meters[0].node_id: 'two words' must be"),
        ({**_modbus("m-1"), "map": "../etc/passwd"}, "meters[0].map: must name a register map"),
        ({**_modbus("m-1"), "push": {"public_keys": []}}, "meters[0]: give exactly one source"),
        ({**_modbus("m-1"), "colour": "red"}, "meters[0]: unknown field(s) ['colour']"),
        (_modbus("m-1", port=70000), "meters[0].modbus.port: must be an integer 1-65535, got 70000"),
        (_modbus("m-1", framer="ascii"), "meters[0].modbus.framer: must be 'socket'"),
        (_modbus("m-1", poll_interval_s=0), "meters[0].modbus.poll_interval_s: must be a positive number"),
        (_modbus("m-1", unit=300), "meters[0].modbus.unit: must be an integer 0-255"),
        (_push("m-1"), "meters[0].push.public_keys: must be a non-empty list"),
        (_push("m-1", "not-a-key"), "meters[0].push.public_keys[0]: 'not-a-key' is not a base64url Ed25519"),
    ],
)
def test_a_bad_entry_names_the_entry_the_field_and_the_rule(entry: dict[str, Any], message: str) -> None:
    with pytest.raises(MeterConfigError) as error:
        parse_meters_config({"meters": [entry]})
    assert message in str(error.value)


def test_a_meter_id_used_twice_and_mixed_framers_on_one_connection_are_refused() -> None:
    with pytest.raises(MeterConfigError, match=r"meters\[1\].meter_id: 'm-1' is already used by meters\[0\]"):
        parse_meters_config({"meters": [_modbus("m-1"), _modbus("m-1", unit=2)]})
    with pytest.raises(MeterConfigError, match=r"modbus\.framer 'rtu' differs from 'socket' of meter 'm-1'"):
        parse_meters_config({"meters": [_modbus("m-1"), _modbus("m-2", unit=2, framer="rtu")]})


def test_the_file_has_the_single_key_meters_so_that_grid_check_reads_it_too() -> None:
    data = {"meters": [_modbus("m-1"), _push("m-2", _key()[0])]}
    assert len(parse_meters_config(data)) == 2
    assert parse_meter_map_yaml(data) == {"m-1": "n1", "m-2": "n2"}
    with pytest.raises(MeterConfigError, match="single key 'meters'"):
        parse_meters_config({**data, "gateways": []})


def test_a_gateway_key_may_push_every_meter_it_is_listed_on_and_a_meter_key_only_its_own() -> None:
    gateway, gateway_pid = _key()
    own, own_pid = _key()
    meters = parse_meters_config(
        {"meters": [_push("m-1", gateway, own), _push("m-2", gateway), _modbus("m-3")]}
    )
    assert push_permissions(meters) == {
        gateway_pid: frozenset({"m-1", "m-2"}),
        own_pid: frozenset({"m-1"}),
    }


def test_loading_finds_each_map_in_the_maps_directory_and_checks_units_on_one_connection(
    tmp_path: Path,
) -> None:
    path = tmp_path / "meters.yaml"
    # Unit 1 is the Eastron map's default, so an entry without a unit collides with one that says 1.
    path.write_text(yaml.safe_dump({"meters": [_modbus("m-1", unit=None), _modbus("m-2", unit=1)]}))
    with pytest.raises(MeterConfigError, match=r"modbus\.unit 1 on 10\.0\.0\.5:502 is taken by meter 'm-1'"):
        load_meters(path)
    path.write_text(yaml.safe_dump({"meters": [_modbus("m-1"), _modbus("m-2", unit=2)]}))
    meters = load_meters(path)
    assert [(m.meter_id, m.unit, m.register_map.id) for m in meters] == [
        ("m-1", 1, "eastron_sdm630_v2"),
        ("m-2", 2, "eastron_sdm630_v2"),
    ]
    with pytest.raises(MeterConfigError, match=r"meters\[0\].map: no register map 'eastron_sdm630_v2' in"):
        load_meters(path, maps_dir=tmp_path)


def test_a_bad_meters_file_is_a_settings_error_naming_the_flag_and_the_file(tmp_path: Path) -> None:
    path = tmp_path / "meters.yaml"
    path.write_text(yaml.safe_dump({"meters": [_modbus("m-1", port="x")]}))
    argv = [
        "--nats-url",
        "nats://127.0.0.1:1",
        "--database-url",
        "sqlite:///x.db",
        "--meters-path",
        str(path),
    ]
    with pytest.raises(SettingsError) as error:
        load_settings(
            Settings, prog="meter_ingest", env_prefix="P2PGRID_METER_INGEST_", description="", argv=argv
        )
    assert error.value.name == "--meters-path"
    assert f"{path}: meters[0].modbus.port: must be an integer" in str(error.value)
    with pytest.raises(SettingsError, match="--maps-dir"):
        load_settings(
            Settings,
            prog="meter_ingest",
            env_prefix="P2PGRID_METER_INGEST_",
            description="",
            argv=[*argv[:4], "--maps-dir", str(tmp_path / "none")],
        )
