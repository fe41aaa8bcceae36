"""Typed settings read flags before environment before defaults, and name the setting in every error."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from services.platform.settings import ServiceSettings, SettingsError, load_settings, setting


@dataclass(frozen=True, kw_only=True)
class ExampleSettings(ServiceSettings):
    batch_size: int = setting(100, help="orders per batch")


def load(argv: list[str], environ: dict[str, str] | None = None) -> ExampleSettings:
    return load_settings(
        ExampleSettings,
        prog="example",
        env_prefix="P2PGRID_EXAMPLE_",
        description="x",
        argv=argv,
        environ=environ or {},
    )


def test_a_flag_wins_over_the_environment_which_wins_over_the_default() -> None:
    env = {"P2PGRID_EXAMPLE_NATS_URL": "nats://127.0.0.1:1", "P2PGRID_EXAMPLE_BATCH_SIZE": "7"}
    assert load([], env).batch_size == 7
    assert load(["--batch-size", "9"], env).batch_size == 9
    assert load(["--nats-url", "nats://h:2"]).batch_size == 100


def test_a_wrong_type_names_the_flag_and_where_the_value_came_from() -> None:
    with pytest.raises(SettingsError) as info:
        load(["--nats-url", "nats://h:1"], {"P2PGRID_EXAMPLE_BATCH_SIZE": "many"})
    assert info.value.name == "--batch-size"
    assert "P2PGRID_EXAMPLE_BATCH_SIZE" in str(info.value) and "'many'" in str(info.value)


def test_a_value_outside_the_choices_is_refused() -> None:
    with pytest.raises(SettingsError, match="--clock"):
        load(["--nats-url", "nats://h:1", "--clock", "sundial"])


def test_a_port_out_of_range_is_refused() -> None:
    with pytest.raises(SettingsError, match="--grpc-port"):
        load(["--nats-url", "nats://h:1", "--grpc-port", "70000"])


def test_a_simulated_clock_is_built_from_the_settings() -> None:
    settings = load(
        [
            "--nats-url",
            "nats://h:1",
            "--clock",
            "sim",
            "--sim-start-s",
            "1000",
            "--sim-speedup",
            "60",
            "--sim-anchor-wall-s",
            "1",
        ]
    )
    clock = settings.make_clock()
    assert clock.now_s() > 1000 + 60 * 1_000_000
