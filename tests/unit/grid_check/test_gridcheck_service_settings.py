"""grid_check's settings fail fast on a bad grid, meter map, operator key or interval, naming the flag."""

from __future__ import annotations

from pathlib import Path

import nacl.signing
import pytest

from services.domain.credentials import b64url
from services.grid_check.settings import DESCRIPTION, SINGLE_NODE_ID, Settings
from services.platform.settings import SettingsError, load_settings

GRID = """\
interval_minutes: 15
price_tick_micro_per_kwh: 100
slack: n0
nodes: [{id: n0}, {id: n1}]
lines: [{id: l1, from: n0, to: n1, capacity_w: 1000}]
"""


def load(*argv: str) -> Settings:
    return load_settings(
        Settings,
        prog="grid_check",
        env_prefix="P2PGRID_GRID_CHECK_",
        description=DESCRIPTION,
        argv=["--nats-url", "nats://127.0.0.1:1", "--database-url", "sqlite:///:memory:", *argv],
        environ={},
    )


@pytest.fixture
def grid_path(tmp_path: Path) -> str:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID)
    return str(path)


def test_without_a_grid_file_the_network_is_a_single_node_with_nothing_to_limit() -> None:
    grid = load().load_grid()
    assert grid.node_ids == (SINGLE_NODE_ID,)
    assert grid.line_ids == ()


def test_a_meter_map_and_operator_keys_are_read_and_checked(grid_path: str, tmp_path: Path) -> None:
    meters = tmp_path / "meters.csv"
    meters.write_text("meter_id,node_id\nm1,n1\n")
    key = bytes(nacl.signing.SigningKey.generate().verify_key)
    settings = load(
        "--grid-path", grid_path, "--meters-path", str(meters), "--operator-keys", f" {b64url(key)}, "
    )
    assert settings.meter_nodes(settings.load_grid()) == {"m1": "n1"}
    assert settings.operator_key_set() == frozenset({key})


@pytest.mark.parametrize(
    ("argv", "flag", "message"),
    [
        (["--grid-path", "/no/such/grid.yaml"], "--grid-path", "does not exist"),
        (["--interval-s", "600"], "--interval-s", "differs from the grid file's interval_minutes"),
        (["--operator-keys", "not-a-key"], "--operator-keys", "key 1 ('not-a-key'): not base64url"),
        (
            ["--operator-keys", ",abcd"],
            "--operator-keys",
            "key 2 ('abcd'): operator key 'abcd' is not a 32-byte",
        ),
        (["--live-publish-interval-s", "0"], "--live-publish-interval-s", "must be positive"),
    ],
)
def test_a_bad_setting_is_named_with_what_is_wrong(
    grid_path: str, argv: list[str], flag: str, message: str
) -> None:
    with pytest.raises(SettingsError) as info:
        load("--grid-path", grid_path, *argv)
    assert info.value.name == flag
    assert message in info.value.message


def test_a_meter_on_a_node_the_grid_does_not_have_stops_the_start(grid_path: str, tmp_path: Path) -> None:
    meters = tmp_path / "meters.csv"
    meters.write_text("meter_id,node_id\nm1,n1\nm2,n5\n")
    with pytest.raises(SettingsError) as info:
        load("--grid-path", grid_path, "--meters-path", str(meters))
    assert info.value.name == "--meters-path"
    assert "row 3: node_id 'n5' of meter 'm2' is not a node of the grid" in info.value.message


def test_a_grid_that_breaks_a_rule_is_reported_with_the_rule(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(GRID.replace("to: n1", "to: n7"))
    with pytest.raises(SettingsError) as info:
        load("--grid-path", str(bad))
    assert info.value.name == "--grid-path"
    assert "n7" in info.value.message
