"""The report of `p2pgrid up` states what the streams and the ledger hold, exactly, and catches a tampered ledger.

One market of three intervals on a four-node feeder is published to a real
nats-server: clearing results (one uncongested, one with a binding line and
two node prices, one with the utility only), interval energy in several
messages (a participant with two meters, a meter without a participant, an
interpolated meter, and a meter that arrives after its interval was settled),
and is settled by the ledger's own consumers, settler and outbox relay into a
real SQLite ledger, whose settlement notices reach the LEDGER stream. The
report's figures are compared with a computation of the settlement rules done
here, by hand, from the same scenario.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread
from nacl.signing import SigningKey

from services.domain.grid import Grid, grid_from_dict
from services.domain.intervals import SimulatedClock
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.ledger.adapters.consumers import clearing_consumer, energy_consumer
from services.ledger.adapters.settler import Settler
from services.ledger.adapters.sql import LedgerStore, migrate_ledger
from services.ledger.domain.settlement import SettlementRules
from services.platform.db import make_engine
from services.platform.metrics import Metrics
from services.platform.nats_bus import NatsBus
from services.platform.nats_server import NatsServer
from services.platform.outbox import OutboxRelay, migrate_platform_tables
from services.platform.subjects import CLEARING_RESULT, INTERVAL_ENERGY, keyed
from services.stack.report import ReportSummary, format_money, write_report

LEDGER_KEY = SigningKey(bytes.fromhex("4ccd089b28ff96da9db6c346ec114e0f5b8a319f35aba624da8cf6ed4fb8a6fb"))
# 2031: every interval of the scenario is past its metering deadline.
LATE_CLOCK = SimulatedClock(start_s=1_924_992_000.0)
T0 = 1_767_225_600  # 2026-01-01 00:00 UTC
INTERVALS = [T0, T0 + 900, T0 + 1800]
UTILITY = "utility"
# The ledger's built-in settlement rules (the service sets utility_participant_id to "utility").
RETAIL, FEED_IN, GRID_FEE, GRID_FEE_SAME_NODE = 300_000, 80_000, 60_000, 15_000

A, B, C, D = (
    "pa11ce0000000000000001",
    "pb0b000000000000000002",
    "pc4a51e00000000000003",
    "pd0000000000000000004",
)
LABELS = {A: "pv-0", B: "ev-1", C: "pv-2", D: "battery-3"}
GRID = {
    "interval_minutes": 15,
    "price_tick_micro_per_kwh": 100,
    "slack": "n0",
    "nodes": [{"id": "n0"}, {"id": "n1"}, {"id": "n2"}, {"id": "n3"}],
    "lines": [
        {"id": "l01", "from": "n0", "to": "n1", "capacity_w": 40_000},
        {"id": "l02", "from": "n0", "to": "n2", "capacity_w": 40_000},
        {"id": "l23", "from": "n2", "to": "n3", "capacity_w": 8_000},
    ],
}


@dataclass(frozen=True)
class TradeRow:
    buyer: str
    buyer_node: str
    seller: str
    seller_node: str
    energy_wh: int


@dataclass(frozen=True)
class IntervalScenario:
    start_s: int
    prices: dict[str, int]
    trades: list[TradeRow]
    flows_w: dict[str, int]
    binding: list[str]
    accepted_wh: list[int]
    """One entry per order of the clearing input (0: rejected)."""
    welfare_nano: int
    meter_messages: list[list[tuple[str, str, int, int, int]]]
    """Messages of (meter_id, participant_id, import_wh, export_wh, flag) published before settlement."""


MEASURED, INTERPOLATED = events_pb2.ENERGY_FLAG_MEASURED, events_pb2.ENERGY_FLAG_INTERPOLATED
SCENARIO = [
    IntervalScenario(
        start_s=INTERVALS[0],
        prices={"n0": 150_000, "n1": 150_000, "n2": 150_000, "n3": 150_000},
        trades=[
            TradeRow(B, "n2", A, "n1", 3_000),
            TradeRow(D, "n1", C, "n3", 1_500),
            TradeRow(B, "n2", UTILITY, "n0", 2_000),
            TradeRow(A, "n1", A, "n1", 500),  # A's own buy and sell at one node: settles nothing
        ],
        flows_w={"l01": -6_000, "l02": 14_000, "l23": -6_000},
        binding=[],
        accepted_wh=[3_000, 500, 500, 3_000, 1_500, 1_500, 2_000, 0, 0],
        welfare_nano=1_234_567_891,
        meter_messages=[
            [
                ("m-a", A, 0, 3_400, MEASURED),
                ("m-b1", B, 3_000, 0, MEASURED),
                ("m-b2", B, 2_100, 0, MEASURED),
                ("m-c", C, 0, 1_450, INTERPOLATED),
                ("feeder-1", "", 9_000, 0, MEASURED),
            ]
        ],
    ),
    IntervalScenario(
        start_s=INTERVALS[1],
        prices={"n0": 120_000, "n1": 120_000, "n2": 120_000, "n3": 95_000},
        trades=[
            TradeRow(A, "n1", C, "n3", 2_000),
            TradeRow(B, "n2", D, "n1", 1_000),
            TradeRow(B, "n2", UTILITY, "n0", 500),
        ],
        flows_w={"l01": 10_000, "l02": -6_000, "l23": -8_000},
        binding=["l23"],
        accepted_wh=[2_000, 2_000, 1_000, 1_000, 500, 0],
        welfare_nano=987_654_321,
        meter_messages=[
            [("m-a", A, 2_100, 0, MEASURED), ("m-b1", B, 1_000, 0, MEASURED)],
            [
                ("m-b2", B, 450, 0, MEASURED),
                ("m-c", C, 0, 2_000, MEASURED),
                ("m-d", D, 0, 1_000, MEASURED),
                ("feeder-1", "", 3_000, 0, MEASURED),
            ],
        ],
    ),
    IntervalScenario(
        start_s=INTERVALS[2],
        prices={"n0": 280_000, "n1": 280_000, "n2": 280_000, "n3": 280_000},
        trades=[TradeRow(A, "n1", UTILITY, "n0", 800), TradeRow(D, "n1", UTILITY, "n0", 1_200)],
        flows_w={"l01": 8_000, "l02": 0, "l23": 0},
        binding=[],
        accepted_wh=[800, 1_200, 2_000],
        welfare_nano=55_000_000,
        meter_messages=[
            [
                ("m-a", A, 800, 0, MEASURED),
                ("m-c", C, 200, 0, MEASURED),
                ("m-d", D, 1_250, 0, MEASURED),
            ]
        ],
    ),
]
# D's meter of the first interval arrives after that interval was settled on D's contracted energy.
LATE_METERS = {INTERVALS[0]: [("m-d", D, 1_300, 0, MEASURED)]}


def clearing_result_event(s: IntervalScenario) -> bytes:
    result = common_pb2.ClearingResult(
        interval=common_pb2.Interval(start_s=s.start_s, length_s=900),
        nodes=[common_pb2.NodePrice(node_id=n, price_micro_per_kwh=p) for n, p in s.prices.items()],
        orders=[common_pb2.OrderAllocation(order_id=f"o{s.start_s}-{i}", accepted_wh=a) for i, a in enumerate(s.accepted_wh)],
        lines=[
            common_pb2.LineFlow(line_id=line, flow_w=flow, binding=line in s.binding)
            for line, flow in s.flows_w.items()
        ],
        trades=[
            common_pb2.Trade(
                buyer_order_id=f"b{i}", seller_order_id=f"s{i}", energy_wh=t.energy_wh,
                buyer_participant_id=t.buyer, seller_participant_id=t.seller,
                buyer_node_id=t.buyer_node, seller_node_id=t.seller_node,
            )
            for i, t in enumerate(s.trades)
        ],
        welfare_nano=s.welfare_nano,
    )  # fmt: skip
    return events_pb2.ClearingResultEvent(
        header=events_pb2.EventHeader(event_id=f"clearing-result-{s.start_s}", producer="matcher"),
        result=result,
    ).SerializeToString()


def interval_energy_event(start_s: int, meters: list[tuple[str, str, int, int, int]], number: int) -> bytes:
    return events_pb2.IntervalEnergy(
        header=events_pb2.EventHeader(
            event_id=f"interval-energy-{start_s}-{number}", producer="meter_ingest"
        ),
        interval=common_pb2.Interval(start_s=start_s, length_s=900),
        meters=[
            events_pb2.MeterIntervalEnergy(
                meter_id=m, participant_id=p, node_id="n1", import_wh=i, export_wh=e, flag=f
            )
            for m, p, i, e, f in meters
        ],
    ).SerializeToString()


# --------------------------------------------------------------------------- the expected figures, by hand


def expected_figures() -> dict[str, Any]:
    """The settlement rules applied to the scenario here, independently of the ledger's code."""
    participants = {
        p: dict.fromkeys(("bought", "sold", "imp", "exp", "paid", "received", "fees", "dev"), 0)
        for p in LABELS
    }
    intervals = []
    for s in SCENARIO:
        row = dict.fromkeys(("purchases", "sales", "fees", "shortfalls", "surpluses"), 0)
        row["volume"] = sum(t.energy_wh for t in s.trades)
        row["local"] = sum(t.energy_wh for t in s.trades if UTILITY not in (t.buyer, t.seller))
        contracted: dict[str, int] = {}
        for t in s.trades:
            if t.buyer == t.seller and t.buyer_node == t.seller_node:
                continue
            purchase, sale = t.energy_wh * s.prices[t.buyer_node], t.energy_wh * s.prices[t.seller_node]
            row["purchases"] += purchase
            row["sales"] += sale
            contracted[t.buyer] = contracted.get(t.buyer, 0) + t.energy_wh
            contracted[t.seller] = contracted.get(t.seller, 0) - t.energy_wh
            if t.buyer != UTILITY:
                fee = t.energy_wh * (GRID_FEE_SAME_NODE if t.buyer_node == t.seller_node else GRID_FEE)
                row["fees"] += fee
                participants[t.buyer]["bought"] += t.energy_wh
                participants[t.buyer]["paid"] += purchase
                participants[t.buyer]["fees"] += fee
            if t.seller != UTILITY:
                participants[t.seller]["sold"] += t.energy_wh
                participants[t.seller]["received"] += sale
        metered: dict[str, list[int]] = {}
        row["import"] = row["export"] = 0
        for meter_id, pid, imp, exp, _flag in [m for msg in s.meter_messages for m in msg] + LATE_METERS.get(
            s.start_s, []
        ):
            del meter_id
            if not pid:
                continue
            metered.setdefault(pid, [0, 0])
            metered[pid][0] += imp
            metered[pid][1] += exp
            row["import"] += imp
            row["export"] += exp
            participants[pid]["imp"] += imp
            participants[pid]["exp"] += exp
        for pid in set(metered) | (set(contracted) - {UTILITY}):
            imp, exp = metered.get(pid, [0, 0])
            deviation_wh = (imp - exp) - contracted.get(pid, 0) if pid in metered else 0
            amount = deviation_wh * (RETAIL if deviation_wh > 0 else FEED_IN)
            participants[pid]["dev"] -= amount
            if amount > 0:
                row["shortfalls"] += amount
            else:
                row["surpluses"] -= amount
        row["rent"] = row["purchases"] - row["sales"]
        intervals.append(row)
    for p in participants.values():
        p["net"] = p["received"] - p["paid"] - p["fees"] + p["dev"]
    return {"participants": participants, "intervals": intervals}


# --------------------------------------------------------------------------- building the market


@dataclass
class Market:
    nats: NatsServer
    ledger_path: Path
    grid: Grid

    @property
    def ledger_url(self) -> str:
        return f"sqlite:///{self.ledger_path}"


async def _wait_consumed(bus: NatsBus, durables: list[tuple[str, str]], timeout_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        pending = 0
        for stream, durable in durables:
            try:
                pending += await bus.consumer_pending(stream, durable)
            except Exception:
                pending += 1  # the consumer is not created yet
        if pending == 0:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"the ledger's consumers did not catch up within {timeout_s} s")


async def _run_market(nats_url: str, ledger_url: str) -> None:
    """Publish the scenario and let the ledger's consumers, settler and outbox relay settle it."""
    bus = await NatsBus.connect(nats_url, name="report-test")
    await bus.ensure_streams()
    engine = make_engine(ledger_url)
    migrate_platform_tables(engine)
    migrate_ledger(engine)
    store = LedgerStore(engine, LEDGER_KEY, clock=LATE_CLOCK)
    writer = ThreadPoolExecutor(max_workers=1)
    metrics = Metrics("ledger")
    common = {"service": "ledger", "bus": bus, "store": store, "writer": writer, "market_id": "default",
              "metrics": metrics, "batch": 64, "ack_wait_s": 30.0}  # fmt: skip
    consumers = [clearing_consumer(**common), energy_consumer(**common)]
    durables = [("CLEARING", "ledger-clearing-results"), ("METERING", "ledger-interval-energy")]
    settler = Settler(
        store=store, rules=SettlementRules.from_mapping({"utility_participant_id": UTILITY}), writer=writer,
        clock=LATE_CLOCK, metrics=metrics, period_s=1.0, on_events=lambda: None,
    )  # fmt: skip
    relay = OutboxRelay(engine, bus)
    stop = asyncio.Event()
    tasks = [asyncio.create_task(c.run(stop)) for c in consumers]
    loop = asyncio.get_running_loop()
    try:
        number = 0
        for s in SCENARIO:
            await bus.publish(
                keyed(CLEARING_RESULT, s.start_s), clearing_result_event(s), event_id=f"cr-{s.start_s}"
            )
            for meters in s.meter_messages:
                number += 1
                await bus.publish(
                    keyed(INTERVAL_ENERGY, s.start_s),
                    interval_energy_event(s.start_s, meters, number),
                    event_id=f"ie-{number}",
                )
        await _wait_consumed(bus, durables)
        settled = await loop.run_in_executor(writer, settler.settle_once)
        assert [x.outcome.interval_start_s for x in settled] == INTERVALS
        for start_s, meters in LATE_METERS.items():
            number += 1
            await bus.publish(
                keyed(INTERVAL_ENERGY, start_s),
                interval_energy_event(start_s, meters, number),
                event_id=f"ie-{number}",
            )
        await _wait_consumed(bus, durables)
        corrected = await loop.run_in_executor(writer, settler.settle_once)
        assert [(x.outcome.interval_start_s, x.outcome.revision) for x in corrected] == [(INTERVALS[0], 1)]
        while await relay.relay_once():
            pass
    finally:
        stop.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        writer.shutdown(wait=True)
        engine.dispose()
        await bus.close()  # fmt: skip


@pytest.fixture(scope="module")
def market(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Market]:
    root = tmp_path_factory.mktemp("report-market")
    server = NatsServer(store_dir=root / "nats")
    server.start()
    try:
        built = Market(server, root / "ledger.db", grid_from_dict(GRID))
        asyncio.run(_run_market(server.url, built.ledger_url))
        yield built
    finally:
        server.cleanup()


def report(
    market: Market, report_dir: Path, *, ledger_url: str | None = None, intervals: list[int] = INTERVALS
) -> ReportSummary:
    return asyncio.run(
        write_report(
            report_dir,
            nats_url=market.nats.url,
            ledger_database_url=ledger_url or market.ledger_url,
            grid=market.grid,
            intervals=intervals,
            labels=LABELS,
            network_name="four-node test feeder",
            ledger_public_key=bytes(LEDGER_KEY.verify_key).hex(),
        )
    )  # fmt: skip


@dataclass
class Written:
    summary: ReportSummary
    folder: Path

    @property
    def data(self) -> dict[str, Any]:
        return dict(json.loads((self.folder / "summary.json").read_text()))

    @property
    def text(self) -> str:
        return (self.folder / "report.md").read_text()


@pytest.fixture(scope="module")
def written(market: Market, tmp_path_factory: pytest.TempPathFactory) -> Written:
    """The report of the three intervals, shared by the tests that only read it."""
    folder = tmp_path_factory.mktemp("report") / "report"
    return Written(report(market, folder), folder)


# --------------------------------------------------------------------------- reading the report back


def money(amount_nano: int) -> str:
    """Nano-currency as the report prints it, computed here: half to even at four decimals."""
    value = (Decimal(amount_nano) / Decimal(10**9)).quantize(Decimal("0.0001"), rounding=ROUND_HALF_EVEN)
    return f"{value + 0:,.4f}"


def kwh(energy_wh: int) -> str:
    return f"{Decimal(energy_wh) / 1000:,.3f}"


def markdown_table(text: str, section: str) -> list[list[str]]:
    """The rows (header excluded) of the first table under `## section`."""
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in body.splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in row.strip("|").split(" | ")] for row in rows[2:]]


# --------------------------------------------------------------------------- tests


def test_the_report_states_exactly_what_was_cleared_metered_and_settled(written: Written) -> None:
    summary = written.summary
    assert summary.ok, summary
    assert (summary.cleared, summary.settled, summary.intervals) == (3, 3, 3)
    assert summary.ledger_verified and summary.ledger_message.startswith("OK: ")
    assert summary.problems == ()

    data = written.data
    expected = expected_figures()
    assert data["ok"] is True and data["ledger"]["verified"] is True
    assert data["ledger"]["trusted_key_checked"] is True
    assert (data["ledger"]["transfers"], data["ledger"]["settlement_revisions"]) == (
        sum(row["transfers"] for row in data["intervals"]),
        4,
    )
    for row, want, s in zip(data["intervals"], expected["intervals"], SCENARIO, strict=True):
        assert row["start_s"] == s.start_s and row["cleared"] and row["settled"]
        assert row["orders"] == len(s.accepted_wh)
        assert row["accepted_orders"] == sum(1 for a in s.accepted_wh if a > 0)
        assert row["volume_wh"] == want["volume"] and row["local_volume_wh"] == want["local"]
        assert row["welfare_nano"] == s.welfare_nano
        assert row["prices_micro_per_kwh"] == s.prices
        assert row["binding_lines"] == s.binding and row["flows_w"] == s.flows_w
        assert (row["metered_import_wh"], row["metered_export_wh"]) == (want["import"], want["export"])
        assert row["settlement_nano"] == {
            "trade_purchases": want["purchases"],
            "trade_sales": want["sales"],
            "grid_fees": want["fees"],
            "congestion_rent": want["rent"],
            "shortfalls": want["shortfalls"],
            "surpluses": want["surpluses"],
        }
    assert [row["ledger_revisions"] for row in data["intervals"]] == [[0, 1], [0], [0]]
    assert [row["settlement_notices"] for row in data["intervals"]] == [[0, 1], [0], [0]]
    assert data["intervals"][0]["unassigned_meters"] == 1
    assert data["intervals"][0]["estimated_meters"] == 1  # m-c was interpolated
    assert data["intervals"][1]["settlement_nano"]["congestion_rent"] == 2_000 * (120_000 - 95_000)

    by_id = {p["participant_id"]: p for p in data["participants"]}
    assert set(by_id) == set(LABELS)
    assert [p["label"] for p in data["participants"]] == ["battery-3", "ev-1", "pv-0", "pv-2"]
    for pid, want in expected["participants"].items():
        got = by_id[pid]
        assert (got["bought_wh"], got["sold_wh"]) == (want["bought"], want["sold"]), pid
        assert (got["metered_import_wh"], got["metered_export_wh"]) == (want["imp"], want["exp"]), pid
        assert got["paid_for_energy_nano"] == want["paid"], pid
        assert got["received_for_energy_nano"] == want["received"], pid
        assert got["grid_fees_nano"] == want["fees"], pid
        assert got["deviations_nano"] == want["dev"], pid
        assert got["net_nano"] == want["net"], pid
    for key in ("bought_wh", "sold_wh", "net_nano", "grid_fees_nano"):
        assert data["participant_totals"][key] == sum(p[key] for p in data["participants"])
    # Every account's net over the run sums to zero with the participants' (double entry).
    assert sum(a["net_nano"] for a in data["accounts"]) + data["participant_totals"]["net_nano"] == 0
    assert {a["account_id"] for a in data["accounts"]} == {
        "market:default",
        "grid_operator:default",
        "utility:default",
    }
    market_account = next(a for a in data["accounts"] if a["account_id"] == "market:default")
    assert market_account["net_nano"] == 0
    assert data["lines"][0] == {
        "line_id": "l23",
        "capacity_w": 8_000,
        "peak_abs_flow_w": 8_000,
        "binding_intervals": 1,
    }
    assert data["price_groups"] == [["n0", "n1", "n2"], ["n3"]]


def test_report_md_shows_the_numbers_of_summary_json(written: Written) -> None:
    data, text = written.data, written.text

    assert "| ledger verified | yes: " in text
    assert "| intervals cleared | 3 of 3 |" in text and "| intervals settled | 3 of 3 |" in text
    participant_rows = markdown_table(text, "Participants")
    assert len(participant_rows) == len(data["participants"]) + 1
    for cells, p in zip(participant_rows, data["participants"], strict=False):
        assert cells[0] == p["label"]
        assert cells[2:] == [
            kwh(p["bought_wh"]), kwh(p["sold_wh"]), kwh(p["metered_import_wh"]), kwh(p["metered_export_wh"]),
            money(p["paid_for_energy_nano"]), money(p["received_for_energy_nano"]), money(p["grid_fees_nano"]),
            money(p["deviations_nano"]), money(p["net_nano"]),
        ]  # fmt: skip
    totals = data["participant_totals"]
    assert participant_rows[-1][0] == "**total**"
    assert participant_rows[-1][-1] == money(totals["net_nano"])

    interval_rows = markdown_table(text, "Intervals")
    assert len(interval_rows) == 3
    for cells, row in zip(interval_rows, data["intervals"], strict=True):
        assert cells[1:5] == [
            str(row["orders"]), str(row["accepted_orders"]), kwh(row["volume_wh"]), kwh(row["local_volume_wh"])
        ]  # fmt: skip
        assert cells[5:7] == [kwh(row["metered_import_wh"]), kwh(row["metered_export_wh"])]
        assert cells[8] == (", ".join(row["binding_lines"]) or "-")
        assert cells[9] == money(row["welfare_nano"])
    assert interval_rows[1][7] == "0.0950 – 0.1200"
    assert interval_rows[0][7] == "0.1500"
    assert interval_rows[0][10] == "yes (revisions 0, 1)"

    settlement_rows = markdown_table(text, "Settlement per interval")
    for cells, row in zip(settlement_rows, data["intervals"], strict=False):
        assert cells[1] == str(row["transfers"])
        assert cells[3:] == [
            money(row["settlement_nano"][k])
            for k in (
                "trade_purchases",
                "trade_sales",
                "grid_fees",
                "congestion_rent",
                "shortfalls",
                "surpluses",
            )
        ]
    price_rows = markdown_table(text, "Prices per node")
    assert [cells[1:] for cells in price_rows] == [
        ["0.1500", "0.1500"],
        ["0.1200", "0.0950"],
        ["0.2800", "0.2800"],
    ]
    assert "## Problems\n\nNone." in text


def test_the_charts_are_valid_pngs_linked_from_the_report(written: Written) -> None:
    text = written.text
    names = ["prices.png", "volume.png", "line_loading.png", "settlement.png"]
    for name in names:
        path = written.folder / name
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        pixels = imread(path)
        assert pixels.shape[0] >= 400 and pixels.shape[1] >= 800, name
        assert float(np.std(pixels)) > 0.01, f"{name} is blank"
        assert f"]({name})" in text
    assert written.data["charts"] == {
        "prices": "prices.png", "volume": "volume.png", "line_loading": "line_loading.png",
        "settlement": "settlement.png",
    }  # fmt: skip


def test_an_interval_never_cleared_nor_settled_makes_the_report_not_ok(
    market: Market, tmp_path: Path
) -> None:
    missing = T0 + 2700
    summary = report(market, tmp_path / "report", intervals=[*INTERVALS, missing])
    assert (summary.cleared, summary.settled, summary.intervals) == (3, 3, 4)
    assert not summary.all_cleared and not summary.all_settled and not summary.ok
    assert summary.ledger_verified
    assert any(f"({missing}): no clearing result" in p for p in summary.problems)
    assert any(f"({missing}): no settlement notice" in p for p in summary.problems)
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| intervals settled | 3 of 4 |" in text
    assert markdown_table(text, "Intervals")[3][1:4] == ["-", "-", "-"]


def test_a_ledger_changed_in_the_database_is_reported_as_not_verified(market: Market, tmp_path: Path) -> None:
    tampered = tmp_path / "tampered.db"
    with (
        contextlib.closing(sqlite3.connect(market.ledger_path)) as source,
        contextlib.closing(sqlite3.connect(tampered)) as copy,
    ):
        source.backup(copy)
        # An attacker with database access drops the append-only triggers, then moves 1 nano.
        for (name,) in copy.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
            copy.execute(f"DROP TRIGGER {name}")
        copy.execute("UPDATE transfers SET amount_nano = amount_nano + 1 WHERE seq = 3")
        copy.commit()  # fmt: skip
    summary = report(market, tmp_path / "report", ledger_url=f"sqlite:///{tampered}")
    assert not summary.ledger_verified and not summary.ok
    assert summary.all_cleared and summary.all_settled
    assert "seq 3" in summary.ledger_message, summary.ledger_message
    data = json.loads((tmp_path / "report" / "summary.json").read_text())
    assert data["ledger"]["verified"] is False and data["ok"] is False
    text = (tmp_path / "report" / "report.md").read_text()
    assert "| ledger verified | **no**: " in text
    assert summary.problems[0].startswith("ledger: does not verify")


def test_money_is_rounded_half_to_even_from_the_exact_integer() -> None:
    assert format_money(1_234_550_000) == "1.2346"
    assert format_money(1_234_450_000) == "1.2344"
    assert format_money(-49_999) == "0.0000"
    assert format_money(-1_000_050_000) == "-1.0000"
    assert format_money(123_456_789_012_345_678) == "123,456,789.0123"
