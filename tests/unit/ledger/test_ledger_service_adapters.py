"""The ledger service's edges without a server: events read into domain values, and settings that fail fast."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.ledger.adapters.events import EventError, clearing_event, energy_event
from services.ledger.domain.settlement import AcceptedEnergy, MeterQuality, MeterReading, Trade
from services.ledger.settings import Settings
from services.platform.settings import SettingsError, load_settings

START_S = 1_800_000_000


def clearing_bytes(
    trades: list[tuple[str, str, str, str, int]], nodes: dict[str, int] | None = None
) -> bytes:
    result = common_pb2.ClearingResult(interval=common_pb2.Interval(start_s=START_S, length_s=900))
    for node_id, price in (nodes if nodes is not None else {"n1": 100_000, "n2": 120_000}).items():
        result.nodes.append(common_pb2.NodePrice(node_id=node_id, price_micro_per_kwh=price))
    for buyer, buyer_node, seller, seller_node, energy_wh in trades:
        result.trades.append(
            common_pb2.Trade(
                buyer_participant_id=buyer,
                buyer_node_id=buyer_node,
                seller_participant_id=seller,
                seller_node_id=seller_node,
                energy_wh=energy_wh,
            )
        )
    header = events_pb2.EventHeader(event_id=f"clearing-result-{START_S}")
    return events_pb2.ClearingResultEvent(header=header, result=result).SerializeToString()


def test_a_clearing_result_event_gives_trades_and_each_participants_accepted_energy() -> None:
    event = clearing_event(
        clearing_bytes(
            [
                ("a", "n2", "b", "n1", 100),
                ("a", "n2", "c", "n1", 50),
                ("c", "n1", "c", "n1", 7),  # c's own buy and sell orders at one node
                ("c", "n2", "c", "n1", 5),  # c moves energy between its two nodes
            ]
        ),
        "demo",
    )
    assert event.event_id == f"clearing-result-{START_S}"
    assert event.self_trades_left_out == 1
    clearing = event.clearing
    assert (clearing.market_id, clearing.interval_start_s, clearing.interval_s) == ("demo", START_S, 900)
    assert clearing.node_prices_micro_per_kwh == {"n1": 100_000, "n2": 120_000}
    assert clearing.trades == (
        Trade("a", "n2", "b", "n1", 100),
        Trade("a", "n2", "c", "n1", 50),
        Trade("c", "n2", "c", "n1", 5),
    )
    assert clearing.accepted == (
        AcceptedEnergy("a", 150, 0),
        AcceptedEnergy("b", 0, 100),
        AcceptedEnergy("c", 5, 55),
    )


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\xff\x00", "not a ClearingResultEvent"),
        (events_pb2.ClearingResultEvent().SerializeToString(), "result: is required"),
        (
            events_pb2.ClearingResultEvent(result=common_pb2.ClearingResult()).SerializeToString(),
            "length_s must be positive",
        ),
    ],
)
def test_an_unreadable_clearing_result_event_is_refused_saying_why(data: bytes, message: str) -> None:
    with pytest.raises(EventError, match=message):
        clearing_event(data, "demo")


def test_a_node_with_two_prices_is_refused() -> None:
    data = events_pb2.ClearingResultEvent.FromString(clearing_bytes([]))
    data.result.nodes.append(common_pb2.NodePrice(node_id="n1", price_micro_per_kwh=1))
    with pytest.raises(EventError, match=r"result.nodes\[2\]: node 'n1' has two prices"):
        clearing_event(data.SerializeToString(), "demo")


def energy_bytes(*meters: events_pb2.MeterIntervalEnergy) -> bytes:
    event = events_pb2.IntervalEnergy(
        header=events_pb2.EventHeader(event_id="interval-energy-1"),
        interval=common_pb2.Interval(start_s=START_S, length_s=900),
    )
    event.meters.extend(meters)
    return event.SerializeToString()


def test_interval_energy_maps_flags_to_qualities_and_skips_meters_without_a_participant() -> None:
    event = energy_event(
        energy_bytes(
            events_pb2.MeterIntervalEnergy(
                meter_id="m1",
                participant_id="a",
                import_wh=5,
                export_wh=1,
                flag=events_pb2.ENERGY_FLAG_MEASURED,
            ),
            events_pb2.MeterIntervalEnergy(
                meter_id="m2", participant_id="a", import_wh=3, flag=events_pb2.ENERGY_FLAG_INTERPOLATED
            ),
            events_pb2.MeterIntervalEnergy(
                meter_id="m3", participant_id="b", export_wh=9, flag=events_pb2.ENERGY_FLAG_ESTIMATED
            ),
            events_pb2.MeterIntervalEnergy(
                meter_id="feeder", import_wh=99, flag=events_pb2.ENERGY_FLAG_MEASURED
            ),
        )
    )
    assert (event.event_id, event.interval_start_s, event.unassigned_meters) == (
        "interval-energy-1",
        START_S,
        1,
    )
    assert event.readings == (
        MeterReading("m1", "a", 5, 1, MeterQuality.MEASURED),
        MeterReading("m2", "a", 3, 0, MeterQuality.ESTIMATED),
        MeterReading("m3", "b", 0, 9, MeterQuality.ESTIMATED),
    )


def test_interval_energy_without_a_flag_or_a_meter_id_is_refused_naming_the_row() -> None:
    good = events_pb2.MeterIntervalEnergy(
        meter_id="m1", participant_id="a", flag=events_pb2.ENERGY_FLAG_MEASURED
    )
    with pytest.raises(EventError, match=r"meters\[1\].flag"):
        energy_event(energy_bytes(good, events_pb2.MeterIntervalEnergy(meter_id="m2", participant_id="a")))
    with pytest.raises(EventError, match=r"meters\[1\].meter_id: is required"):
        energy_event(energy_bytes(good, events_pb2.MeterIntervalEnergy(participant_id="a")))
    with pytest.raises(EventError, match="interval: is required"):
        energy_event(events_pb2.IntervalEnergy().SerializeToString())


def load(*argv: str) -> Settings:
    return load_settings(
        Settings, prog="ledger", env_prefix="P2PGRID_LEDGER_", description="", argv=argv, environ={}
    )


def test_the_signing_key_lives_next_to_a_sqlite_database_and_is_required_with_postgresql(
    tmp_path: Path,
) -> None:
    settings = load("--nats-url", "nats://127.0.0.1:1", "--database-url", f"sqlite:///{tmp_path}/l.db")
    assert settings.signing_key_path() == tmp_path / "l.db.signing-key"
    with pytest.raises(SettingsError, match=r"--signing-key-file.*required with a PostgreSQL"):
        load("--nats-url", "nats://127.0.0.1:1", "--database-url", "postgresql+psycopg://u@h/db")
    chosen = load(
        "--nats-url", "nats://127.0.0.1:1", "--database-url", "postgresql+psycopg://u@h/db",
        "--signing-key-file", str(tmp_path / "k"),
    )  # fmt: skip
    assert chosen.signing_key_path() == tmp_path / "k"


def test_rules_come_built_in_or_from_yaml_with_the_metering_delay_overridable(tmp_path: Path) -> None:
    base = ("--nats-url", "nats://127.0.0.1:1", "--database-url", f"sqlite:///{tmp_path}/l.db")
    built_in = load(*base).rules()
    assert (built_in.utility_participant_id, built_in.metering_delay_s) == ("utility", 900)
    path = tmp_path / "rules.yaml"
    path.write_text("grid_operator: dso\nretail_tariff_micro_per_kwh: 310000\nmetering_delay_s: 60\n")
    from_file = load(*base, "--rules-path", str(path)).rules()
    assert (from_file.grid_operator, from_file.retail_tariff_micro_per_kwh) == ("dso", 310_000)
    assert (from_file.utility_participant_id, from_file.metering_delay_s) == ("utility", 60)
    assert load(*base, "--rules-path", str(path), "--metering-delay-s", "0").rules().metering_delay_s == 0
    path.write_text("retail_tariff_micro_per_kwh: -1\n")
    with pytest.raises(SettingsError, match=r"--rules-path.*retail_tariff_micro_per_kwh"):
        load(*base, "--rules-path", str(path))
    with pytest.raises(SettingsError, match=r"--rules-path.*cannot read"):
        load(*base, "--rules-path", str(tmp_path / "missing.yaml"))
    with pytest.raises(SettingsError, match="--market-id"):
        load(*base, "--market-id", "a market")
