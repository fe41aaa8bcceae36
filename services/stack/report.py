"""The report folder of `p2pgrid up`: what each interval cleared, metered and settled, and whether the ledger verifies.

`write_report` is called once, after the last wanted interval has settled and
while the stack still runs. It reads:

- the clearing results of the wanted intervals from the CLEARING stream
  (`ClearingResultEvent` on `p2pgrid.clearing.result.<start_s>`; the first
  one of an interval counts, as in the ledger);
- the metered energy from the METERING stream (`IntervalEnergy` on
  `p2pgrid.metering.energy.<start_s>`; per meter the best quality delivered,
  measured before interpolated before estimated; meters without a
  participant are counted but not summed);
- the settlement notices from the LEDGER stream (`IntervalSettled`, one per
  settlement revision);
- the ledger's database: the transfers of the wanted intervals (all
  revisions, corrections included) and the settlement revisions, read from
  one snapshot without blocking the ledger's writer;
- the verdict of `p2pgrid ledger verify` on the whole ledger (hash chain,
  Merkle roots, signed checkpoints, account totals, balances summing to
  zero), run as its own process.

The streams are read through ephemeral consumers that acknowledge nothing,
so the services' own consumers are untouched.

It writes into the report folder:

- `report.md`: the run summary, a table per interval, prices per node, line
  loading, a table per participant, the settlement per interval, the other
  accounts, links to the charts and any problems found;
- `prices.png`, `volume.png`, `line_loading.png`, `settlement.png`;
- `summary.json`: the same figures as exact integers (Wh, micro-currency per
  kWh, nano-currency, W).

Every figure is an exact integer until it is printed: energy as kWh with three
decimals (exact), prices in currency per kWh with four decimals (six where a
price needs them; exact), money in currency rounded half to even to four
decimals, loadings in percent rounded to one decimal. Floats appear only in the
charts.

Per participant: energy bought and sold comes from the clearing results'
trades, leaving out trades of a participant with itself at one node (they
settle nothing, as in the ledger); money comes from the ledger's transfers, as
the net of each settlement rule from the participant's side: paid for energy
(`trade.purchase`), received for energy (`trade.sale`), grid fees
(`grid_fee`), deviations against the utility (`deviation`, positive when the
utility paid), and the net of all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from pathlib import Path
from typing import Any

from services.domain.grid import Grid
from services.domain.intervals import Interval
from services.gen.p2pgrid.events.v1 import events_pb2
from services.ledger.domain.settlement import (
    CODE_CONGESTION_RENT,
    CODE_DEVIATION,
    CODE_GRID_FEE,
    CODE_PURCHASE,
    CODE_SALE,
)
from services.platform.nats_bus import NatsBus, NatsConnectError
from services.platform.subjects import CLEARING_RESULT, INTERVAL_ENERGY, LEDGER_SETTLED

SUMMARY_FORMAT = 1
MONEY_DECIMALS = 4
UTILITY_PARTICIPANT_ID = "utility"
"""The participant id of the utility's standing orders in clearing results (the matcher's and the ledger's)."""
CHARTS = {
    "prices": "prices.png",
    "volume": "volume.png",
    "line_loading": "line_loading.png",
    "settlement": "settlement.png",
}
CHART_TITLES = {
    "prices": "Prices per node",
    "volume": "Cleared volume against metered energy",
    "line_loading": "Line loading",
    "settlement": "Settlement totals",
}
LOADING_CHART_LINES = 10
"""The line loading chart draws the lines with the highest peak loading, at most this many."""
PRICE_GROUP_COLUMNS = 8
"""Above this many groups of nodes with different prices, the markdown gives each interval's range only."""
_VERIFY_OK = re.compile(
    r"OK: (?P<transfers>\d+) transfers, (?P<checkpoints>\d+) checkpoints, (?P<accounts>\d+) accounts, "
    r"(?P<revisions>\d+) settlement revisions verified.*; root (?P<root>[0-9a-f]+)"
)
_SETTLED_ID = re.compile(r"ledger-settled-(-?\d+)-r(\d+)")
_QUALITY_RANK = {
    events_pb2.ENERGY_FLAG_MEASURED: 3,
    events_pb2.ENERGY_FLAG_INTERPOLATED: 2,
    events_pb2.ENERGY_FLAG_ESTIMATED: 1,
}


class ReportError(RuntimeError):
    """The report could not be written at all (e.g. NATS unreachable); the message says why."""


@dataclass(frozen=True, slots=True)
class ReportSummary:
    """What `p2pgrid up` needs to decide its exit code, and where the report is."""

    report_dir: Path
    intervals: int
    cleared: int
    settled: int
    ledger_verified: bool
    ledger_message: str
    """`OK: …` with the counts, or the first failure, as `p2pgrid ledger verify` words them."""
    problems: tuple[str, ...]
    """Contradictions between the streams and the ledger, and intervals not cleared or settled."""

    @property
    def all_cleared(self) -> bool:
        return self.cleared == self.intervals

    @property
    def all_settled(self) -> bool:
        return self.settled == self.intervals

    @property
    def ok(self) -> bool:
        return self.ledger_verified and self.all_cleared and self.all_settled and not self.problems


# --------------------------------------------------------------------------- exact formatting


def format_kwh(energy_wh: int) -> str:
    """Whole Wh as kWh with three decimals, exactly: 1234567 → `1,234.567`."""
    return f"{Decimal(energy_wh).scaleb(-3):,.3f}"


def format_money(amount_nano: int) -> str:
    """Nano-currency as currency rounded half to even to four decimals: 1234567890 → `1.2346`."""
    value = Decimal(amount_nano).scaleb(-9).quantize(Decimal(1).scaleb(-MONEY_DECIMALS), ROUND_HALF_EVEN)
    return f"{abs(value) if value == 0 else value:,.{MONEY_DECIMALS}f}"


def format_price(price_micro_per_kwh: int) -> str:
    """Micro-currency per kWh as currency per kWh, exactly, with four decimals or six where needed."""
    value = Decimal(price_micro_per_kwh).scaleb(-6)
    places = 4 if value == value.quantize(Decimal("0.0001")) else 6
    return f"{value:.{places}f}"


def format_percent(numerator: int, denominator: int) -> str:
    """numerator / denominator in percent, rounded half to even to one decimal."""
    value = (Decimal(numerator * 100) / Decimal(denominator)).quantize(Decimal("0.1"), ROUND_HALF_EVEN)
    return f"{value:.1f} %"


def _interval_label(start_s: int) -> str:
    return Interval(start_s, 1).iso().replace("T", " ")


def _natural_key(text: str) -> tuple[tuple[int, Any], ...]:
    return tuple((0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text) if part)


# --------------------------------------------------------------------------- what is read


@dataclass(slots=True)
class _Streams:
    clearing: dict[int, bytes] = field(default_factory=dict)
    """interval → the first ClearingResultEvent published for it."""
    meters: dict[int, dict[str, events_pb2.MeterIntervalEnergy]] = field(default_factory=dict)
    """interval → meter id → its best delivered energy."""
    notices: dict[int, dict[int, events_pb2.IntervalSettled]] = field(default_factory=dict)
    """interval → revision → its settlement notice."""


@dataclass(frozen=True, slots=True)
class _LedgerTransfer:
    debit_account: str
    credit_account: str
    amount_nano: int
    code: str


@dataclass(frozen=True, slots=True)
class _Revision:
    revision: int
    clearing_digest: str
    transfer_count: int
    estimated_count: int


@dataclass(slots=True)
class _Ledger:
    verified: bool = False
    message: str = ""
    counts: dict[str, Any] = field(default_factory=dict)
    transfers: dict[int, list[_LedgerTransfer]] = field(default_factory=dict)
    revisions: dict[int, list[_Revision]] = field(default_factory=dict)
    read_error: str = ""


async def _read_subject(bus: NatsBus, stream: str, filter_subject: str, timeout_s: float) -> list[bytes]:
    """Every message on `filter_subject` now in `stream`, oldest first, through an ephemeral consumer."""
    from nats.errors import TimeoutError as NatsTimeoutError
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
    from nats.js.errors import NotFoundError

    # Explicit acks: a fetch that times out on a busy machine may drop the part of a batch it received,
    # and those messages come again after ack_wait instead of being lost; stream sequences skip repeats.
    config = ConsumerConfig(
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=10.0,
        max_ack_pending=-1,
        deliver_policy=DeliverPolicy.ALL,
        inactive_threshold=60.0,
        mem_storage=True,
    )
    try:
        subscription = await bus.js.pull_subscribe(filter_subject, stream=stream, config=config)
    except NotFoundError:
        return []  # no such stream: nothing was ever published on it
    name = ""
    try:
        info = await subscription.consumer_info()
        name = str(info.name)
        wanted = int(info.num_pending or 0)
        by_sequence: dict[int, bytes] = {}
        deadline = time.monotonic() + timeout_s
        while len(by_sequence) < wanted:
            if time.monotonic() > deadline:
                raise ReportError(
                    f"reading {filter_subject} from stream {stream}: {wanted - len(by_sequence)} messages "
                    f"still missing after {timeout_s:g} s"
                )
            try:
                msgs = await subscription.fetch(min(wanted - len(by_sequence), 64), timeout=5.0)
            except (NatsTimeoutError, TimeoutError):
                continue
            for msg in msgs:
                by_sequence.setdefault(int(msg.metadata.sequence.stream), bytes(msg.data))
                await msg.ack()
        return [by_sequence[sequence] for sequence in sorted(by_sequence)]
    finally:
        with contextlib.suppress(Exception):
            await subscription.unsubscribe()
        if name:
            with contextlib.suppress(Exception):
                await bus.js.delete_consumer(stream, name)


async def _read_streams(nats_url: str, wanted: set[int], timeout_s: float) -> _Streams:
    try:
        bus = await NatsBus.connect(nats_url, name="p2pgrid-report")
    except NatsConnectError as exc:
        raise ReportError(str(exc)) from None
    streams = _Streams()
    try:
        for data in await _read_subject(bus, "CLEARING", f"{CLEARING_RESULT}.>", timeout_s):
            start_s = int(events_pb2.ClearingResultEvent.FromString(data).result.interval.start_s)
            if start_s in wanted:
                streams.clearing.setdefault(start_s, data)
        for data in await _read_subject(bus, "METERING", f"{INTERVAL_ENERGY}.>", timeout_s):
            energy = events_pb2.IntervalEnergy.FromString(data)
            start_s = int(energy.interval.start_s)
            if start_s not in wanted:
                continue
            held = streams.meters.setdefault(start_s, {})
            for meter in energy.meters:
                before = held.get(meter.meter_id)
                if before is None or _QUALITY_RANK.get(meter.flag, 0) > _QUALITY_RANK.get(before.flag, 0):
                    held[meter.meter_id] = meter
        for data in await _read_subject(bus, "LEDGER", f"{LEDGER_SETTLED}.>", timeout_s):
            notice = events_pb2.IntervalSettled.FromString(data)
            start_s = int(notice.interval_start_s)
            if start_s not in wanted:
                continue
            by_revision = streams.notices.setdefault(start_s, {})
            match = _SETTLED_ID.fullmatch(notice.header.event_id)
            revision = int(match.group(2)) if match else len(by_revision)
            by_revision.setdefault(revision, notice)
    finally:
        await bus.close()
    return streams


def _read_snapshot(engine: Any, queries: Sequence[Any]) -> list[list[Any]]:
    """The rows of `queries`, all from one snapshot of the database, without blocking the ledger's writer.

    On SQLite the engine's transactions begin IMMEDIATE (they take the write
    lock), so the reads run on the raw connection in a deferred transaction,
    which in WAL mode is a snapshot that takes no lock.
    """
    if engine.dialect.name != "sqlite":
        with engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn, conn.begin():
            return [list(conn.execute(query)) for query in queries]
    raw = engine.raw_connection()
    try:
        cursor = raw.cursor()
        cursor.execute("BEGIN")
        try:
            out = []
            for query in queries:
                sql = str(query.compile(dialect=engine.dialect, compile_kwargs={"literal_binds": True}))
                cursor.execute(sql)
                out.append(list(cursor.fetchall()))
            return out
        finally:
            cursor.execute("ROLLBACK")
    finally:
        raw.close()


async def _verify_ledger(
    database_url: str, public_key: str | None, workers: int
) -> tuple[bool, str, dict[str, Any]]:
    """Run `p2pgrid ledger verify` on the ledger: (verified, its OK line or first failure, the counts it names).

    The command runs as a process of its own, so that its hashing (seconds
    for a day of a large market) holds neither this process's interpreter nor
    its event loop, and its worker processes fork from a process without threads.
    """
    command = [sys.executable, "-m", "services.cli", "ledger", "verify", "--database-url", database_url]
    command += ["--workers", str(max(1, workers)), "--quiet"]
    if public_key:
        command += ["--key", public_key]
    try:
        process = await asyncio.create_subprocess_exec(
            *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await process.communicate()
    except OSError as exc:
        return False, f"cannot run p2pgrid ledger verify: {exc}", {}
    said = [line.strip() for line in (out + err).decode(errors="replace").splitlines() if line.strip()]
    if process.returncode != 0:
        failure = next((line for line in reversed(said) if line.startswith("FAIL: ")), "")
        return (
            False,
            failure.removeprefix("FAIL: ") or f"p2pgrid ledger verify exited with {process.returncode}",
            {},
        )
    ok_line = next((line for line in said if line.startswith("OK: ")), "OK")
    match = _VERIFY_OK.search(ok_line)
    counts: dict[str, Any] = {"trusted_key_checked": bool(public_key)}
    if match:
        counts.update(
            transfers=int(match["transfers"]),
            checkpoints=int(match["checkpoints"]),
            accounts=int(match["accounts"]),
            settlement_revisions=int(match["revisions"]),
            root_hash=match["root"],
        )
    return True, ok_line, counts


async def _read_ledger(
    database_url: str, market_id: str, wanted: Sequence[int], public_key: str | None, workers: int
) -> _Ledger:
    """Verify the ledger with `p2pgrid ledger verify`, and read the wanted intervals' transfers and revisions."""
    from services.platform.db import DatabaseUrlError, parse_database_url

    ledger = _Ledger()
    try:
        parsed = parse_database_url(database_url)
    except DatabaseUrlError as exc:
        ledger.message = ledger.read_error = str(exc)
        return ledger
    if parsed.get_backend_name() == "sqlite" and not Path(parsed.database or "").is_file():
        # Opening a missing SQLite file would create an empty one.
        ledger.message = ledger.read_error = f"no ledger database at {parsed.database!r}"
        return ledger
    rows = asyncio.to_thread(_read_ledger_rows, database_url, market_id, wanted, ledger)
    (ledger.verified, ledger.message, ledger.counts), _ = await asyncio.gather(
        _verify_ledger(database_url, public_key, workers), rows
    )
    return ledger


def _read_ledger_rows(database_url: str, market_id: str, wanted: Sequence[int], ledger: _Ledger) -> None:
    """The transfers and settlement revisions of the wanted intervals, into `ledger`."""
    from sqlalchemy import select

    from services.ledger.adapters.sql import settled_intervals_table, transfers_table
    from services.platform.db import make_engine

    engine = make_engine(database_url)
    try:
        t = transfers_table.c
        s = settled_intervals_table.c
        queries = [
            select(t.interval_start_s, t.debit_account, t.credit_account, t.amount_nano, t.code)
            .where(t.interval_start_s.in_(list(wanted)))
            .order_by(t.seq),
            select(s.interval_start_s, s.revision, s.clearing_digest, s.transfer_count, s.estimated_count)
            .where(s.market_id == market_id, s.interval_start_s.in_(list(wanted)))
            .order_by(s.interval_start_s, s.revision),
        ]
        try:
            transfer_rows, revision_rows = _read_snapshot(engine, queries)
            for row in transfer_rows:
                ledger.transfers.setdefault(int(row[0]), []).append(
                    _LedgerTransfer(str(row[1]), str(row[2]), int(row[3]), str(row[4]))
                )
            for row in revision_rows:
                ledger.revisions.setdefault(int(row[0]), []).append(
                    _Revision(int(row[1]), str(row[2]), int(row[3]), int(row[4]))
                )
        except Exception as exc:
            ledger.read_error = f"cannot read the settled intervals from {database_url}: {exc}"
    finally:
        engine.dispose()


# --------------------------------------------------------------------------- figures


@dataclass(slots=True)
class _IntervalFigures:
    start_s: int
    length_s: int
    cleared: bool = False
    settled: bool = False
    orders: int = 0
    accepted_orders: int = 0
    volume_wh: int = 0
    local_volume_wh: int = 0
    welfare_nano: int = 0
    prices_micro_per_kwh: dict[str, int] = field(default_factory=dict)
    binding_lines: list[str] = field(default_factory=list)
    flows_w: dict[str, int] = field(default_factory=dict)
    meters: int = 0
    unassigned_meters: int = 0
    estimated_meters: int = 0
    metered_import_wh: int = 0
    metered_export_wh: int = 0
    notices: list[int] = field(default_factory=list)
    revisions: list[int] = field(default_factory=list)
    transfers: int = 0
    settlement_nano: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "start_s": self.start_s,
            "length_s": self.length_s,
            "start_utc": Interval(self.start_s, 1).iso(),
            "cleared": self.cleared,
            "settled": self.settled,
            "orders": self.orders,
            "accepted_orders": self.accepted_orders,
            "volume_wh": self.volume_wh,
            "local_volume_wh": self.local_volume_wh,
            "welfare_nano": self.welfare_nano,
            "prices_micro_per_kwh": dict(self.prices_micro_per_kwh),
            "binding_lines": list(self.binding_lines),
            "flows_w": dict(self.flows_w),
            "meters": self.meters,
            "unassigned_meters": self.unassigned_meters,
            "estimated_meters": self.estimated_meters,
            "metered_import_wh": self.metered_import_wh,
            "metered_export_wh": self.metered_export_wh,
            "settlement_notices": list(self.notices),
            "ledger_revisions": list(self.revisions),
            "transfers": self.transfers,
            "settlement_nano": dict(self.settlement_nano),
        }


SETTLEMENT_KEYS = (
    ("trade_purchases", "trade purchases"),
    ("trade_sales", "trade sales"),
    ("grid_fees", "grid fees"),
    ("congestion_rent", "congestion rent"),
    ("shortfalls", "shortfalls (to utility)"),
    ("surpluses", "surpluses (from utility)"),
)


@dataclass(slots=True)
class _ParticipantFigures:
    participant_id: str
    label: str
    bought_wh: int = 0
    sold_wh: int = 0
    metered_import_wh: int = 0
    metered_export_wh: int = 0
    net_by_code_nano: dict[str, int] = field(default_factory=dict)

    @property
    def paid_for_energy_nano(self) -> int:
        return -self.net_by_code_nano.get(CODE_PURCHASE, 0)

    @property
    def received_for_energy_nano(self) -> int:
        return self.net_by_code_nano.get(CODE_SALE, 0)

    @property
    def grid_fees_nano(self) -> int:
        return -self.net_by_code_nano.get(CODE_GRID_FEE, 0)

    @property
    def deviations_nano(self) -> int:
        return self.net_by_code_nano.get(CODE_DEVIATION, 0)

    @property
    def net_nano(self) -> int:
        return sum(self.net_by_code_nano.values())

    def to_json(self) -> dict[str, Any]:
        return {
            "participant_id": self.participant_id,
            "label": self.label,
            "bought_wh": self.bought_wh,
            "sold_wh": self.sold_wh,
            "metered_import_wh": self.metered_import_wh,
            "metered_export_wh": self.metered_export_wh,
            "paid_for_energy_nano": self.paid_for_energy_nano,
            "received_for_energy_nano": self.received_for_energy_nano,
            "grid_fees_nano": self.grid_fees_nano,
            "deviations_nano": self.deviations_nano,
            "net_nano": self.net_nano,
        }


PARTICIPANT_SUMS = (
    "bought_wh",
    "sold_wh",
    "metered_import_wh",
    "metered_export_wh",
    "paid_for_energy_nano",
    "received_for_energy_nano",
    "grid_fees_nano",
    "deviations_nano",
    "net_nano",
)


@dataclass(slots=True)
class _Figures:
    intervals: list[_IntervalFigures]
    participants: list[_ParticipantFigures]
    accounts: dict[str, tuple[int, int]]
    """Accounts other than participants' → (debits_nano, credits_nano) over the wanted intervals."""
    problems: list[str]


def _account_kind(account_id: str) -> str:
    return account_id.split(":", 1)[0]


class _Tally:
    """Goes through the wanted intervals one by one, adding up per participant and per account."""

    def __init__(self, market_id: str, streams: _Streams, ledger: _Ledger) -> None:
        self.market_id = market_id
        self.streams = streams
        self.ledger = ledger
        self.problems: list[str] = []
        self.bought: dict[str, int] = {}
        self.sold: dict[str, int] = {}
        self.imported: dict[str, int] = {}
        self.exported: dict[str, int] = {}
        self.by_account: dict[str, dict[str, int]] = {}
        """account → settlement code → net amount (credits − debits)."""
        self.account_totals: dict[str, tuple[int, int]] = {}

    def interval(self, start_s: int, length_s: int) -> _IntervalFigures:
        row = _IntervalFigures(start_s, length_s)
        where = f"interval {_interval_label(start_s)} ({start_s})"
        raw = self.streams.clearing.get(start_s)
        if raw is None:
            self.problems.append(f"{where}: no clearing result on the CLEARING stream")
            expected_purchases = None
        else:
            expected_purchases = self._clearing(row, raw, where)
        self._meters(row)
        self._settlement(row, where, expected_purchases)
        return row

    def _clearing(self, row: _IntervalFigures, raw: bytes, where: str) -> int:
        """The clearing result's figures; returns what its trades come to at the buyers' node prices."""
        from services.ledger.adapters.events import EventError, clearing_event

        result = events_pb2.ClearingResultEvent.FromString(raw).result
        row.cleared = True
        row.length_s = int(result.interval.length_s) or row.length_s
        row.orders = len(result.orders)
        row.accepted_orders = sum(1 for order in result.orders if order.accepted_wh > 0)
        row.welfare_nano = int(result.welfare_nano)
        row.prices_micro_per_kwh = {n.node_id: int(n.price_micro_per_kwh) for n in result.nodes}
        row.flows_w = {line.line_id: int(line.flow_w) for line in result.lines}
        row.binding_lines = [line.line_id for line in result.lines if line.binding]
        purchases_nano = 0
        for t in result.trades:
            energy_wh = int(t.energy_wh)
            row.volume_wh += energy_wh
            if UTILITY_PARTICIPANT_ID not in (t.buyer_participant_id, t.seller_participant_id):
                row.local_volume_wh += energy_wh
            if t.buyer_participant_id == t.seller_participant_id and t.buyer_node_id == t.seller_node_id:
                continue  # the participant's own buy and sell at one node: nothing to settle
            self.bought[t.buyer_participant_id] = self.bought.get(t.buyer_participant_id, 0) + energy_wh
            self.sold[t.seller_participant_id] = self.sold.get(t.seller_participant_id, 0) + energy_wh
            price = row.prices_micro_per_kwh.get(t.buyer_node_id)
            if price is None:
                self.problems.append(f"{where}: a trade's buyer node {t.buyer_node_id!r} has no price")
            else:
                purchases_nano += energy_wh * price
        # The ledger must have settled exactly this result: compare its digest with each revision's.
        try:
            digest = clearing_event(raw, self.market_id).clearing.digest()
        except EventError as exc:
            self.problems.append(f"{where}: the clearing result cannot be read by the ledger: {exc}")
            return purchases_nano
        for revision in self.ledger.revisions.get(row.start_s, []):
            if revision.clearing_digest != digest:
                self.problems.append(
                    f"{where}: revision {revision.revision} was settled from another clearing result "
                    f"(digest {revision.clearing_digest}) than the one published ({digest})"
                )
        return purchases_nano

    def _meters(self, row: _IntervalFigures) -> None:
        for meter in self.streams.meters.get(row.start_s, {}).values():
            row.meters += 1
            if meter.flag != events_pb2.ENERGY_FLAG_MEASURED:
                row.estimated_meters += 1
            pid = meter.participant_id
            if not pid:
                row.unassigned_meters += 1
                continue
            row.metered_import_wh += int(meter.import_wh)
            row.metered_export_wh += int(meter.export_wh)
            self.imported[pid] = self.imported.get(pid, 0) + int(meter.import_wh)
            self.exported[pid] = self.exported.get(pid, 0) + int(meter.export_wh)

    def _settlement(self, row: _IntervalFigures, where: str, expected_purchases: int | None) -> None:
        notices = self.streams.notices.get(row.start_s, {})
        revisions = self.ledger.revisions.get(row.start_s, [])
        row.notices = sorted(notices)
        row.revisions = [r.revision for r in revisions]
        row.settled = 0 in notices and 0 in row.revisions
        if not notices:
            self.problems.append(f"{where}: no settlement notice on the LEDGER stream")
        if not revisions and not self.ledger.read_error:
            self.problems.append(f"{where}: not settled in the ledger database")
        for r in revisions:
            notice = notices.get(r.revision)
            if notice is not None and int(notice.transfers) != r.transfer_count:
                self.problems.append(
                    f"{where}: the notice of revision {r.revision} names {notice.transfers} transfers, "
                    f"the ledger booked {r.transfer_count}"
                )
        transfers = self.ledger.transfers.get(row.start_s, [])
        row.transfers = len(transfers)
        amounts = dict.fromkeys((key for key, _ in SETTLEMENT_KEYS), 0)
        # Per participant: positive, it paid the utility (a shortfall); negative, the utility paid it (a surplus).
        deviations: dict[str, int] = {}
        purchases_gross = 0
        for tr in transfers:
            debit_kind, credit_kind = _account_kind(tr.debit_account), _account_kind(tr.credit_account)
            amount = tr.amount_nano
            # A correction may run against a rule's usual direction; it then counts negative.
            if tr.code == CODE_PURCHASE:
                purchases_gross += amount
                amounts["trade_purchases"] += -amount if debit_kind == "market" else amount
            elif tr.code == CODE_SALE:
                amounts["trade_sales"] += amount if debit_kind == "market" else -amount
            elif tr.code == CODE_GRID_FEE:
                amounts["grid_fees"] += amount if credit_kind == "grid_operator" else -amount
            elif tr.code == CODE_CONGESTION_RENT:
                amounts["congestion_rent"] += amount if debit_kind == "market" else -amount
            elif tr.code == CODE_DEVIATION:
                if credit_kind == "utility":
                    deviations[tr.debit_account] = deviations.get(tr.debit_account, 0) + amount
                else:
                    deviations[tr.credit_account] = deviations.get(tr.credit_account, 0) - amount
            for account, signed in ((tr.debit_account, -amount), (tr.credit_account, amount)):
                codes = self.by_account.setdefault(account, {})
                codes[tr.code] = codes.get(tr.code, 0) + signed
            debits, credits = self.account_totals.get(tr.debit_account, (0, 0))
            self.account_totals[tr.debit_account] = (debits + amount, credits)
            debits, credits = self.account_totals.get(tr.credit_account, (0, 0))
            self.account_totals[tr.credit_account] = (debits, credits + amount)
        amounts["shortfalls"] = sum(v for v in deviations.values() if v > 0)
        amounts["surpluses"] = -sum(v for v in deviations.values() if v < 0)
        row.settlement_nano = amounts
        if expected_purchases is not None and revisions and amounts["trade_purchases"] != expected_purchases:
            self.problems.append(
                f"{where}: the ledger booked {amounts['trade_purchases']} nano of trade purchases, the clearing "
                f"result's trades at node prices come to {expected_purchases}"
            )
        # Each notice names what its revision paid for trades; only complete sets of notices can be compared.
        if notices and set(notices) == set(row.revisions):
            notice_purchases = sum(int(n.traded_amount_nano) for n in notices.values())
            if notice_purchases != purchases_gross:
                self.problems.append(
                    f"{where}: the settlement notices name {notice_purchases} nano paid for trades, "
                    f"the ledger booked {purchases_gross}"
                )

    def participants(self, labels: Mapping[str, str]) -> list[_ParticipantFigures]:
        ids = set(labels) | set(self.bought) | set(self.sold) | set(self.imported) | set(self.exported)
        ids |= {a.split(":", 1)[1] for a in self.by_account if _account_kind(a) == "participant"}
        ids.discard(UTILITY_PARTICIPANT_ID)
        out = [
            _ParticipantFigures(
                participant_id=pid,
                label=labels.get(pid, ""),
                bought_wh=self.bought.get(pid, 0),
                sold_wh=self.sold.get(pid, 0),
                metered_import_wh=self.imported.get(pid, 0),
                metered_export_wh=self.exported.get(pid, 0),
                net_by_code_nano=dict(sorted(self.by_account.get(f"participant:{pid}", {}).items())),
            )
            for pid in ids
        ]
        out.sort(key=lambda p: (p.label == "", _natural_key(p.label), p.participant_id))
        return out

    def other_accounts(self) -> dict[str, tuple[int, int]]:
        return {
            account: totals
            for account, totals in sorted(self.account_totals.items())
            if _account_kind(account) != "participant"
        }


def _compute(
    grid: Grid,
    wanted: Sequence[int],
    labels: Mapping[str, str],
    streams: _Streams,
    ledger: _Ledger,
    market_id: str,
) -> _Figures:
    tally = _Tally(market_id, streams, ledger)
    rows = [tally.interval(start_s, grid.interval_s) for start_s in wanted]
    if ledger.read_error:
        tally.problems.append(f"ledger: {ledger.read_error}")
    return _Figures(rows, tally.participants(labels), tally.other_accounts(), tally.problems)


# --------------------------------------------------------------------------- price groups and loading


def _node_order(grid: Grid, rows: Sequence[_IntervalFigures]) -> list[str]:
    known = list(grid.node_ids)
    extra = sorted({node for row in rows for node in row.prices_micro_per_kwh} - set(known))
    return known + extra


def _price_groups(grid: Grid, rows: Sequence[_IntervalFigures]) -> list[list[str]]:
    """Nodes that had the same price in every cleared interval, in network order, as groups."""
    groups: dict[tuple[int | None, ...], list[str]] = {}
    cleared = [row for row in rows if row.cleared]
    for node in _node_order(grid, rows):
        series = tuple(row.prices_micro_per_kwh.get(node) for row in cleared)
        if all(price is None for price in series):
            continue
        groups.setdefault(series, []).append(node)
    return list(groups.values())


def _group_name(group: Sequence[str], all_nodes: int) -> str:
    if len(group) == all_nodes:
        return f"all {all_nodes} nodes"
    if len(group) <= 3:
        return ", ".join(group)
    return f"{', '.join(group[:2])} … {group[-1]} ({len(group)} nodes)"


@dataclass(frozen=True, slots=True)
class _LineLoading:
    line_id: str
    capacity_w: int
    peak_flow_w: int
    binding_intervals: int

    def to_json(self) -> dict[str, Any]:
        return {
            "line_id": self.line_id,
            "capacity_w": self.capacity_w,
            "peak_abs_flow_w": self.peak_flow_w,
            "binding_intervals": self.binding_intervals,
        }


def _line_loadings(grid: Grid, rows: Sequence[_IntervalFigures]) -> list[_LineLoading]:
    """Every line with a capacity, by peak loading (|flow| / capacity) over the run, highest first."""
    out = []
    for line in grid.lines:
        peak = max((abs(row.flows_w.get(line.id, 0)) for row in rows), default=0)
        binding = sum(1 for row in rows if line.id in row.binding_lines)
        out.append(_LineLoading(line.id, line.capacity_w, peak, binding))
    # A line of capacity 0 that carries anything is overloaded: it comes first.
    return sorted(
        out,
        key=lambda x: (
            not (x.capacity_w == 0 and x.peak_flow_w > 0),
            -Fraction(x.peak_flow_w, x.capacity_w) if x.capacity_w else Fraction(0),
            x.line_id,
        ),
    )


# --------------------------------------------------------------------------- markdown


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[bool]) -> list[str]:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |"

    return [line(headers), "|" + "|".join("---:" if r else "---" for r in right) + "|", *map(line, rows)]


def _price_cell(row: _IntervalFigures) -> str:
    if not row.cleared or not row.prices_micro_per_kwh:
        return "-"
    prices = sorted(set(row.prices_micro_per_kwh.values()))
    if len(prices) == 1:
        return format_price(prices[0])
    return f"{format_price(prices[0])} – {format_price(prices[-1])}"


def _participant_name(p: _ParticipantFigures) -> str:
    return p.label or p.participant_id[:12]


@dataclass(frozen=True, slots=True)
class _Markdown:
    """report.md, one method per section."""

    figures: _Figures
    grid: Grid
    network_name: str
    ledger: _Ledger
    loadings: Sequence[_LineLoading]
    groups: Sequence[list[str]]
    totals: Mapping[str, int]
    summary: ReportSummary

    def render(self) -> str:
        sections = (
            self.run,
            self.intervals,
            self.prices,
            self.line_loading,
            self.participants,
            self.settlement,
            self.other_accounts,
            self.charts,
            self.problems,
        )
        out = ["# p2pgrid market report", ""]
        for section in sections:
            out += [*section(), ""]
        return "\n".join(out)

    def _ledger_verdict(self) -> str:
        counts = self.ledger.counts
        if not self.ledger.verified:
            return f"**no**: {self.ledger.message}"
        if "transfers" not in counts:
            return f"yes: {self.ledger.message}"
        return (
            f"yes: {counts['transfers']:,} transfers, {counts['checkpoints']:,} checkpoints, "
            f"{counts['accounts']:,} accounts, {counts['settlement_revisions']:,} settlement revisions "
            f"(hash chain, Merkle roots, signed checkpoints, balances); root {str(counts['root_hash'])[:16]}…"
        )

    def run(self) -> list[str]:
        rows, grid = self.figures.intervals, self.grid
        n, first, last = len(rows), rows[0], rows[-1]
        shape = f"{len(grid.nodes)} nodes, {len(grid.lines)} lines, slack {grid.slack}"
        network = (
            f"the network {self.network_name} ({shape})" if self.network_name else f"a network of {shape}"
        )
        problems = self.figures.problems
        return [
            f"{n} delivery interval{'s' if n != 1 else ''} of {first.length_s // 60} min, "
            f"{_interval_label(first.start_s)} to {_interval_label(last.start_s + last.length_s)} (UTC); "
            f"{len(self.figures.participants)} prosumers on {network}.",
            "",
            *_table(
                ["run", ""],
                [
                    ["intervals cleared", f"{self.summary.cleared} of {n}"],
                    ["intervals settled", f"{self.summary.settled} of {n}"],
                    ["ledger verified", self._ledger_verdict()],
                    [
                        "cleared volume",
                        f"{format_kwh(sum(r.volume_wh for r in rows))} kWh, of which "
                        f"{format_kwh(sum(r.local_volume_wh for r in rows))} kWh between prosumers",
                    ],
                    ["welfare", format_money(sum(r.welfare_nano for r in rows))],
                    ["problems", f"{len(problems)} (listed at the end)" if problems else "none"],
                ],
                [False, False],
            ),
            "",
            "Energy in kWh (exact, from whole Wh); prices in currency per kWh (exact); money in currency, "
            f"rounded half to even to {MONEY_DECIMALS} decimals. `summary.json` holds the exact integers (Wh, "
            "micro-currency per kWh, nano-currency, W).",
        ]

    def intervals(self) -> list[str]:
        def cells(row: _IntervalFigures) -> list[str]:
            cleared = [
                str(row.orders),
                str(row.accepted_orders),
                format_kwh(row.volume_wh),
                format_kwh(row.local_volume_wh),
            ]
            revisions = ", ".join(map(str, row.revisions))
            return [
                _interval_label(row.start_s),
                *(cleared if row.cleared else ["-"] * len(cleared)),
                format_kwh(row.metered_import_wh),
                format_kwh(row.metered_export_wh),
                _price_cell(row),
                ", ".join(row.binding_lines) or "-",
                format_money(row.welfare_nano) if row.cleared else "-",
                ("yes" if row.settled else "no")
                + (f" (revisions {revisions})" if len(row.revisions) > 1 else ""),
            ]

        headers = ["interval (UTC)", "orders", "accepted", "cleared kWh", "between prosumers kWh"]
        headers += ["metered import kWh", "metered export kWh", "price per kWh", "binding lines", "welfare"]
        return [
            "## Intervals",
            "",
            *_table(
                [*headers, "settled"],
                [cells(row) for row in self.figures.intervals],
                [False, True, True, True, True, True, True, True, False, True, False],
            ),
        ]

    def prices(self) -> list[str]:
        groups, rows = self.groups, self.figures.intervals
        out = ["## Prices per node", ""]
        if not groups:
            return [*out, "No interval was cleared."]
        if len(groups) > PRICE_GROUP_COLUMNS:
            return [
                *out,
                f"{len(groups)} groups of nodes had different prices; the table of intervals gives each "
                "interval's range and `summary.json` every node's price.",
            ]
        all_nodes = sum(len(g) for g in groups)
        names = [chr(ord("A") + i) for i in range(len(groups))]
        price_rows = [
            [
                _interval_label(row.start_s),
                *(
                    format_price(row.prices_micro_per_kwh[g[0]])
                    if row.cleared and g[0] in row.prices_micro_per_kwh
                    else "-"
                    for g in groups
                ),
            ]
            for row in rows
        ]
        return [
            *out,
            "Nodes that had the same price in every interval share a column; the groups are "
            + "; ".join(f"**{name}**: {', '.join(g)}" for name, g in zip(names, groups, strict=True))
            + ".",
            "",
            *_table(
                [
                    "interval (UTC)",
                    *(f"{name}: {_group_name(g, all_nodes)}" for name, g in zip(names, groups, strict=True)),
                ],
                price_rows,
                [False, *([True] * len(groups))],
            ),
        ]

    def line_loading(self) -> list[str]:
        shown = [x for x in self.loadings if x.peak_flow_w > 0][:LOADING_CHART_LINES]
        if not shown:
            return ["## Line loading", "", "No line carried any flow."]
        return [
            "## Line loading",
            "",
            f"Peak |flow| / capacity over the run, the {len(shown)} most loaded of {len(self.grid.lines)} lines "
            "(flows are the interval's average power from the clearing result).",
            "",
            *_table(
                ["line", "capacity kW", "peak |flow| kW", "peak loading", "binding in intervals"],
                [
                    [
                        x.line_id,
                        format_kwh(x.capacity_w),
                        format_kwh(x.peak_flow_w),
                        format_percent(x.peak_flow_w, x.capacity_w) if x.capacity_w else "overloaded",
                        str(x.binding_intervals),
                    ]
                    for x in shown
                ],
                [False, True, True, True, True],
            ),
        ]

    def participants(self) -> list[str]:
        rows = [
            [
                _participant_name(p),
                f"`{p.participant_id[:16]}`",
                *(format_kwh(getattr(p, key)) for key in PARTICIPANT_SUMS[:4]),
                *(format_money(getattr(p, key)) for key in PARTICIPANT_SUMS[4:]),
            ]
            for p in self.figures.participants
        ]
        rows.append(
            [
                "**total**",
                "",
                *(format_kwh(self.totals[key]) for key in PARTICIPANT_SUMS[:4]),
                *(format_money(self.totals[key]) for key in PARTICIPANT_SUMS[4:]),
            ]
        )
        headers = ["participant", "id", "bought kWh", "sold kWh", "metered import kWh", "metered export kWh"]
        headers += ["paid for energy", "received for energy", "grid fees", "deviations", "net"]
        return [
            "## Participants",
            "",
            "Energy bought and sold from the clearing results' trades, metered energy from the meters' interval "
            "energy, money from the ledger's transfers (all revisions): paid for energy at the buyer's node "
            "price, received at the seller's, grid fees, deviations from the contracted energy settled with the "
            "utility (positive: the utility paid), and the net of all of them.",
            "",
            *_table(headers, rows, [False, False, *([True] * 9)]),
        ]

    def settlement(self) -> list[str]:
        rows = self.figures.intervals
        table_rows = [
            [
                _interval_label(row.start_s),
                str(row.transfers),
                ", ".join(map(str, row.revisions)) or "-",
                *(format_money(row.settlement_nano.get(key, 0)) for key, _ in SETTLEMENT_KEYS),
            ]
            for row in rows
        ]
        table_rows.append(
            [
                "**total**",
                str(sum(row.transfers for row in rows)),
                "",
                *(
                    format_money(sum(row.settlement_nano.get(key, 0) for row in rows))
                    for key, _ in SETTLEMENT_KEYS
                ),
            ]
        )
        return [
            "## Settlement per interval",
            "",
            "Net amounts booked per rule over all revisions of the interval; shortfalls are deviations paid to "
            "the utility at the retail tariff, surpluses those paid by the utility at the feed-in tariff.",
            "",
            *_table(
                ["interval (UTC)", "transfers", "revisions", *(name for _, name in SETTLEMENT_KEYS)],
                table_rows,
                [False, True, False, *([True] * len(SETTLEMENT_KEYS))],
            ),
        ]

    def other_accounts(self) -> list[str]:
        accounts = self.figures.accounts
        if not accounts:
            return ["## Other accounts", "", "No transfers were booked for these intervals."]
        return [
            "## Other accounts",
            "",
            *_table(
                ["account", "debits", "credits", "net (credits − debits)"],
                [
                    [f"`{account}`", format_money(d), format_money(c), format_money(c - d)]
                    for account, (d, c) in accounts.items()
                ],
                [False, True, True, True],
            ),
        ]

    def charts(self) -> list[str]:
        out = ["## Charts"]
        for key, name in CHARTS.items():
            out += ["", f"### {CHART_TITLES[key]}", "", f"[![{CHART_TITLES[key]}]({name})]({name})"]
        return out

    def problems(self) -> list[str]:
        return ["## Problems", "", *([f"- {p}" for p in self.figures.problems] or ["None."])]


# --------------------------------------------------------------------------- charts


def _tick_positions(count: int) -> list[int]:
    step = max(1, count // 12)
    return list(range(0, count, step))


def _time_axis(ax: Any, rows: Sequence[_IntervalFigures]) -> None:
    ticks = _tick_positions(len(rows))
    ax.set_xticks(ticks)
    ax.set_xticklabels([Interval(rows[i].start_s, 1).iso()[11:16] for i in ticks], rotation=0)
    ax.set_xlabel(f"interval start (UTC), {Interval(rows[0].start_s, 1).iso()[:10]}")
    ax.grid(True, alpha=0.3)


def _draw_charts(
    report_dir: Path,
    grid: Grid,
    figures: _Figures,
    groups: Sequence[list[str]],
    loadings: Sequence[_LineLoading],
) -> None:
    from matplotlib.figure import Figure

    rows = figures.intervals
    x = list(range(len(rows)))
    all_nodes = sum(len(g) for g in groups)
    nan = float("nan")

    fig = Figure(figsize=(10, 5), dpi=100)
    ax = fig.subplots()
    for i, group in enumerate(groups[:12]):
        ys = [
            row.prices_micro_per_kwh[group[0]] / 1e6
            if row.cleared and group[0] in row.prices_micro_per_kwh
            else nan
            for row in rows
        ]
        # Earlier groups are drawn wider, so that a group with the same price as a later one stays visible.
        ax.step(
            x,
            ys,
            where="mid",
            marker="o",
            markersize=3,
            linewidth=max(1.0, 3.5 - 0.5 * i) if len(groups) <= 4 else 1.2,
            label=_group_name(group, all_nodes),
        )
    ax.set_ylabel("price, currency per kWh")
    ax.set_title(
        "Prices per node" + (f" ({len(groups)} groups, 12 drawn)" if len(groups) > 12 else ""), loc="left"
    )
    if groups:
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _time_axis(ax, rows)
    fig.tight_layout()
    fig.savefig(report_dir / CHARTS["prices"])

    fig = Figure(figsize=(10, 5), dpi=100)
    ax = fig.subplots()
    width = 0.28
    ax.bar([i - width for i in x], [row.volume_wh / 1000 for row in rows], width, label="cleared (trades)")
    ax.bar(x, [row.metered_import_wh / 1000 for row in rows], width, label="metered import")
    ax.bar(
        [i + width for i in x], [row.metered_export_wh / 1000 for row in rows], width, label="metered export"
    )
    ax.set_ylabel("energy, kWh")
    ax.set_title("Cleared volume against metered energy", loc="left")
    ax.legend(fontsize=8)
    _time_axis(ax, rows)
    fig.tight_layout()
    fig.savefig(report_dir / CHARTS["volume"])

    fig = Figure(figsize=(10, 5), dpi=100)
    ax = fig.subplots()
    drawn = [x_ for x_ in loadings if x_.capacity_w > 0 and x_.peak_flow_w > 0][:LOADING_CHART_LINES]
    for line in drawn:
        ys = [
            abs(row.flows_w[line.line_id]) * 100 / line.capacity_w
            if row.cleared and line.line_id in row.flows_w
            else nan
            for row in rows
        ]
        ax.plot(x, ys, marker="o", markersize=3, label=line.line_id)
    ax.axhline(100.0, color="red", linestyle="--", linewidth=1, label="capacity (100 %)")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("|flow| / capacity, %")
    ax.set_title(f"Line loading: the {len(drawn)} most loaded of {len(grid.lines)} lines", loc="left")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    _time_axis(ax, rows)
    fig.tight_layout()
    fig.savefig(report_dir / CHARTS["line_loading"])

    fig = Figure(figsize=(10, 8), dpi=100)
    top, bottom = fig.subplots(2, 1)
    for key, name in SETTLEMENT_KEYS:
        top.plot(
            x, [row.settlement_nano.get(key, 0) / 1e9 for row in rows], marker="o", markersize=3, label=name
        )
    top.set_ylabel("amount, currency")
    top.set_title("Settlement per interval", loc="left")
    top.legend(fontsize=8, ncol=3)
    _time_axis(top, rows)
    people = sorted(figures.participants, key=lambda p: p.net_nano)
    nets = [p.net_nano / 1e9 for p in people]
    if len(people) <= 40:
        bottom.bar(range(len(people)), nets, color=["tab:red" if v < 0 else "tab:green" for v in nets])
    else:
        # A thousand bars cost seconds to draw; two filled areas show the same distribution.
        positions = list(range(len(people)))
        zeros = [0.0] * len(people)
        below = [v < 0 for v in nets]
        bottom.fill_between(positions, nets, zeros, where=below, step="mid", color="tab:red", linewidth=0)
        above = [not b for b in below]
        bottom.fill_between(positions, nets, zeros, where=above, step="mid", color="tab:green", linewidth=0)
    bottom.axhline(0.0, color="black", linewidth=0.8)
    bottom.set_ylabel("net, currency")
    bottom.set_title("Net per participant over the run (received − paid)", loc="left")
    if len(people) <= 40:
        bottom.set_xticks(range(len(people)))
        bottom.set_xticklabels([_participant_name(p) for p in people], rotation=90, fontsize=7)
    else:
        bottom.set_xlabel(f"{len(people)} participants, sorted by net")
    bottom.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(report_dir / CHARTS["settlement"])


# --------------------------------------------------------------------------- the call


async def write_report(
    report_dir: Path,
    *,
    nats_url: str,
    ledger_database_url: str,
    grid: Grid,
    intervals: Sequence[int],
    labels: Mapping[str, str],
    network_name: str = "",
    ledger_public_key: str | None = None,
    market_id: str = "default",
    verify_workers: int | None = None,
    read_timeout_s: float = 60.0,
    progress: Callable[[str], None] | None = None,
) -> ReportSummary:
    """Write report.md, summary.json and the charts for `intervals` (their start_s) into `report_dir`.

    `labels` maps participant ids to readable names; `ledger_public_key` (hex,
    base64 or a file holding one, as `p2pgrid ledger verify --key` takes it)
    makes the verification check every checkpoint signature against that key.
    The verification runs in a process of its own with `verify_workers`
    hashing processes (default: as `p2pgrid ledger verify`, the CPUs, at
    most 4). `progress` is told each step as it starts. Raises ReportError if
    NATS cannot be reached or a stream cannot be read in `read_timeout_s`; a
    ledger that cannot be read or does not verify is reported, not raised.
    """
    from services.ledger.cli import default_verify_workers

    wanted = sorted(set(intervals))
    if not wanted:
        raise ValueError("intervals must name at least one interval")
    say = progress or (lambda _message: None)
    say("reading clearing results, interval energy and settlement notices")
    streams = await _read_streams(nats_url, set(wanted), read_timeout_s)
    say("verifying the ledger")
    workers = verify_workers if verify_workers is not None else default_verify_workers()
    ledger = await _read_ledger(ledger_database_url, market_id, wanted, ledger_public_key, workers)
    figures = _compute(grid, wanted, labels, streams, ledger, market_id)
    if not ledger.verified:
        figures.problems.insert(0, f"ledger: does not verify: {ledger.message}")
    groups = _price_groups(grid, figures.intervals)
    loadings = _line_loadings(grid, figures.intervals)
    totals = {key: sum(int(getattr(p, key)) for p in figures.participants) for key in PARTICIPANT_SUMS}
    summary = ReportSummary(
        report_dir=report_dir,
        intervals=len(wanted),
        cleared=sum(1 for row in figures.intervals if row.cleared),
        settled=sum(1 for row in figures.intervals if row.settled),
        ledger_verified=ledger.verified,
        ledger_message=ledger.message,
        problems=tuple(figures.problems),
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    say("drawing charts")
    await asyncio.to_thread(_draw_charts, report_dir, grid, figures, groups, loadings)
    document = {
        "format": SUMMARY_FORMAT,
        "ok": summary.ok,
        "intervals_wanted": len(wanted),
        "intervals_cleared": summary.cleared,
        "intervals_settled": summary.settled,
        "network": {
            "name": network_name,
            "nodes": list(grid.node_ids),
            "slack": grid.slack,
            "line_capacity_w": {line.id: line.capacity_w for line in grid.lines},
        },
        "ledger": {"verified": ledger.verified, "message": ledger.message, **ledger.counts},
        "intervals": [row.to_json() for row in figures.intervals],
        "participants": [p.to_json() for p in figures.participants],
        "participant_totals": totals,
        "accounts": [
            {"account_id": a, "debits_nano": d, "credits_nano": c, "net_nano": c - d}
            for a, (d, c) in figures.accounts.items()
        ],
        "lines": [x.to_json() for x in loadings],
        "price_groups": groups,
        "charts": dict(CHARTS),
        "problems": list(figures.problems),
    }
    (report_dir / "summary.json").write_text(json.dumps(document, indent=2) + "\n")
    markdown = _Markdown(figures, grid, network_name, ledger, loadings, groups, totals, summary).render()
    (report_dir / "report.md").write_text(markdown)
    say(f"report written to {report_dir}")
    return summary
