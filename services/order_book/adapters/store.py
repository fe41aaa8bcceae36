"""The order book's database: its tables, the one writer transaction that places, amends, cancels and freezes, and reads.

Guarantees, kept by `BookStore.apply_ops` (one transaction per call, and the
only code that writes orders):

- every stored order has a book sequence, assigned in the transaction that
  stores it; the sequences are 1, 2, 3, ... without gaps: the writer hands
  them out consecutively and only advances its counter once the transaction
  committed (it starts from the highest stored one). One process writes a
  book: `hold_writer_lock` makes a second one wait, then fail;
- (participant, client_order_id) is stored at most once, for ever; a repeat
  with the same body answers the first receipt, one with a different body is
  ALREADY_EXISTS;
- no order enters, leaves or changes in an interval once its gate has closed
  on the service clock or the interval has been frozen;
- freezing interval T records S (the last book sequence), marks T's live
  orders with book_seq <= S frozen, and writes T's clearing request to the
  outbox, all in one transaction; intervals are frozen in order, so T is
  frozen exactly when T <= the last frozen interval.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import DecodeError
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    and_,
    bindparam,
    func,
    select,
    update,
)

from services.domain.errors import AlreadyExists, DomainError, FailedPrecondition, NotFound
from services.domain.ids import IdMaker
from services.gen.p2pgrid.common.v1 import common_pb2
from services.gen.p2pgrid.events.v1 import events_pb2
from services.order_book.domain.clearing import (
    ClearingResultRejected,
    FrozenOrder,
    IntervalOutcome,
    fills_from_result,
)
from services.order_book.domain.market import IntervalCleared, IntervalClosed, MarketEvent, MarketRules
from services.order_book.domain.orders import (
    Fill,
    Meter,
    OrderBody,
    OrderRecord,
    OrderState,
    Participant,
    Receipt,
    Side,
    SignedOrder,
)
from services.platform.db import migrate
from services.platform.outbox import add_to_outbox, migrate_platform_tables
from services.platform.subjects import CLEARING_REQUEST, ORDER_EVENTS, keyed

log = logging.getLogger(__name__)

MIGRATIONS = "services.order_book.adapters.migrations"
VERSION_TABLE = "alembic_version_order_book"
PRODUCER = "order_book"
_IN_CHUNK = 400
# Placements stored with COPY on PostgreSQL from this many rows on.
_COPY_MIN_ROWS = 64

_big = BigInteger().with_variant(Integer(), "sqlite")
metadata = MetaData()
participants_t = Table(
    "ob_participants",
    metadata,
    Column("participant_id", String(64), primary_key=True),
    Column("public_key", LargeBinary(), nullable=False, unique=True),
    Column("node_id", String(64), nullable=False),
    Column("display_name", String(64), nullable=False),
    Column("registered_at_s", BigInteger(), nullable=False),
)
meters_t = Table(
    "ob_meters",
    metadata,
    Column("meter_id", String(64), primary_key=True),
    Column("participant_id", String(64), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("registered_at_s", BigInteger(), nullable=False),
)
book_state_t = Table(
    "ob_book_state",
    metadata,
    Column("id", Integer(), primary_key=True, autoincrement=False),
    Column("first_interval_start_s", BigInteger(), nullable=False),
)
orders_t = Table(
    "ob_orders",
    metadata,
    Column("book_seq", _big, primary_key=True, autoincrement=False),
    Column("order_id", String(32), nullable=False, unique=True),
    Column("participant_id", String(64), nullable=False),
    Column("client_order_id", String(64), nullable=False),
    Column("side", SmallInteger(), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("interval_start_s", BigInteger(), nullable=False),
    Column("energy_wh", BigInteger(), nullable=False),
    Column("price_micro_per_kwh", BigInteger(), nullable=False),
    Column("signature", LargeBinary(), nullable=False),
    Column("state", SmallInteger(), nullable=False),
    Column("accepted_at_s", BigInteger(), nullable=False),
    Column("replaces_order_id", String(32), nullable=True),
    Column("replaced_by_order_id", String(32), nullable=True),
    Column("accepted_wh", BigInteger(), nullable=True),
    Column("fill_price_micro_per_kwh", BigInteger(), nullable=True),
)
intervals_t = Table(
    "ob_intervals",
    metadata,
    Column("interval_start_s", BigInteger(), primary_key=True, autoincrement=False),
    Column("gate_closure_s", BigInteger(), nullable=False),
    Column("book_seq_max", BigInteger(), nullable=False),
    Column("frozen_at_s", Float(), nullable=False),
    Column("orders_frozen", BigInteger(), nullable=False),
    Column("cleared_at_s", Float(), nullable=True),
    Column("volume_wh", BigInteger(), nullable=True),
    Column("node_prices_json", Text(), nullable=True),
    Column("result_event_id", String(128), nullable=True),
)
fills_t = Table(
    "ob_fills",
    metadata,
    Column("fill_seq", _big, primary_key=True, autoincrement=True),
    Column("participant_id", String(64), nullable=False),
    Column("order_id", String(32), nullable=False, unique=True),
    Column("client_order_id", String(64), nullable=False),
    Column("interval_start_s", BigInteger(), nullable=False),
    Column("side", SmallInteger(), nullable=False),
    Column("node_id", String(64), nullable=False),
    Column("energy_wh", BigInteger(), nullable=False),
    Column("accepted_wh", BigInteger(), nullable=False),
    Column("price_micro_per_kwh", BigInteger(), nullable=False),
    Column("created_at_s", Float(), nullable=False),
)

_ORDER_COLUMNS = (
    orders_t.c.book_seq,
    orders_t.c.order_id,
    orders_t.c.participant_id,
    orders_t.c.client_order_id,
    orders_t.c.side,
    orders_t.c.node_id,
    orders_t.c.interval_start_s,
    orders_t.c.energy_wh,
    orders_t.c.price_micro_per_kwh,
    orders_t.c.signature,
    orders_t.c.state,
    orders_t.c.accepted_at_s,
    orders_t.c.replaces_order_id,
    orders_t.c.replaced_by_order_id,
    orders_t.c.accepted_wh,
    orders_t.c.fill_price_micro_per_kwh,
)

_INSERT_COLUMNS = (
    "book_seq",
    "order_id",
    "participant_id",
    "client_order_id",
    "side",
    "node_id",
    "interval_start_s",
    "energy_wh",
    "price_micro_per_kwh",
    "signature",
    "state",
    "accepted_at_s",
    "replaces_order_id",
)
_PREFETCH_COLUMNS = (*_INSERT_COLUMNS[:9], "accepted_at_s", "replaces_order_id")
_LIVE = int(OrderState.LIVE)


# The operations the writer batches into one transaction. Each carries its own
# result slot: a value or the DomainError the caller gets.


@dataclass(slots=True, eq=False)
class PlaceOp:
    participant_id: str
    orders: Sequence[SignedOrder]
    # Field prefix per order for error messages: "body" or "orders[3].body".
    prefixes: Sequence[str]
    results: list[Receipt | DomainError] = field(default_factory=list)


@dataclass(slots=True, eq=False)
class AmendOp:
    participant_id: str
    order_id: str
    replacement: SignedOrder
    result: Receipt | DomainError | None = None


@dataclass(slots=True, eq=False)
class CancelOp:
    participant_id: str
    order_id: str
    result: OrderRecord | DomainError | None = None


@dataclass(slots=True, eq=False)
class FreezeOp:
    interval_start_s: int
    # Set when this op froze the interval (None if it was frozen already).
    result: IntervalClosed | None = None


Op = PlaceOp | AmendOp | CancelOp | FreezeOp


@dataclass(slots=True)
class WriteOutcome:
    """What a committed transaction changed, for metrics and notifications."""

    placed: dict[Side, int] = field(default_factory=lambda: {Side.BUY: 0, Side.SELL: 0})
    # Change in live orders per interval (placed minus cancelled).
    live_delta: dict[int, int] = field(default_factory=dict)
    closed: list[IntervalClosed] = field(default_factory=list)
    outbox_events: int = 0


@dataclass(frozen=True, slots=True)
class BookState:
    last_seq: int
    first_interval_start_s: int
    last_frozen_start_s: int | None


def _record(row: Any) -> OrderRecord:
    return OrderRecord(
        order_id=row.order_id,
        participant_id=row.participant_id,
        body=OrderBody(
            row.client_order_id,
            Side(row.side),
            row.node_id,
            row.interval_start_s,
            row.energy_wh,
            row.price_micro_per_kwh,
        ),
        signature=bytes(row.signature),
        state=OrderState(row.state),
        book_seq=row.book_seq,
        accepted_at_s=row.accepted_at_s,
        accepted_wh=row.accepted_wh,
        fill_price_micro_per_kwh=row.fill_price_micro_per_kwh,
        replaces_order_id=row.replaces_order_id,
        replaced_by_order_id=row.replaced_by_order_id,
    )


# Rows travel as mappings: those read back and those waiting to be inserted look alike.
Row = Mapping[Any, Any]


def _same_body(row: Row, body: OrderBody) -> bool:
    return bool(
        row["side"] == body.side
        and row["node_id"] == body.node_id
        and row["interval_start_s"] == body.interval_start_s
        and row["energy_wh"] == body.energy_wh
        and row["price_micro_per_kwh"] == body.price_micro_per_kwh
    )


def _receipt_of(row: Row) -> Receipt:
    return Receipt(row["order_id"], row["client_order_id"], row["book_seq"], row["accepted_at_s"])


class _Txn:
    """State of one writer transaction: the next sequence, known client ids and rows waiting to be inserted."""

    def __init__(
        self,
        conn: Connection | None,
        cursor: Any,
        now_s: float,
        last_seq: int,
        last_frozen_start_s: int | None,
    ) -> None:
        # None on the placements-only path, which runs on a bare driver connection.
        self._conn = conn
        # The driver's own cursor: the hot statements skip SQLAlchemy's per-statement work.
        self.cursor = cursor
        self.now_s = now_s
        self.now_int_s = int(now_s)
        self.last_seq = last_seq
        self.last_frozen_start_s = last_frozen_start_s
        # (participant, client_order_id) -> the stored or pending order's columns.
        self.known: dict[tuple[str, str], Row] = {}
        self.pending: list[tuple[Any, ...]] = []
        self.outcome = WriteOutcome()

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError(
                "this transaction runs on a driver connection; SQLAlchemy statements need apply_ops' other path"
            )
        return self._conn


class BookStore:
    """All database access of the order book; every method is blocking and runs off the event loop."""

    def __init__(self, engine: Engine, rules: MarketRules, *, publish_order_events: bool = False) -> None:
        self.engine = engine
        self.rules = rules
        self.publish_order_events = publish_order_events
        self._last_seq = 0
        self._last_frozen_start_s: int | None = None
        self._resync = False
        mark = "?" if engine.dialect.name == "sqlite" else "%s"
        self._insert_sql = f"INSERT INTO ob_orders ({', '.join(_INSERT_COLUMNS)}) VALUES ({', '.join([mark] * len(_INSERT_COLUMNS))})"
        self._postgres = engine.dialect.name == "postgresql"
        self._copy_sql = f"COPY ob_orders ({', '.join(_INSERT_COLUMNS)}) FROM STDIN"
        # The writer's own driver connection for placements (see apply_ops).
        self._raw: Any = None
        self._id_maker = IdMaker()
        self._ids: list[str] = []
        # SQLite plans a row-value IN as a scan; two plain IN lists are an index search.
        columns = ", ".join(_PREFETCH_COLUMNS)
        self._prefetch_sql = (
            f"SELECT {columns} FROM ob_orders WHERE participant_id = ANY(%s) AND client_order_id = ANY(%s)"
            if self._postgres
            else f"SELECT {columns} FROM ob_orders WHERE participant_id IN ({{participants}}) "
            "AND client_order_id IN ({client_ids})"
        )

    # Schema and start-up.

    def migrate(self) -> None:
        migrate_platform_tables(self.engine)
        migrate(self.engine, MIGRATIONS, VERSION_TABLE)

    def open_book(self, first_open_start_s: int) -> BookState:
        """Read the last book sequence and frozen interval; on first start record where gate closures begin."""
        with self.engine.begin() as conn:
            first_s = conn.execute(
                select(book_state_t.c.first_interval_start_s).where(book_state_t.c.id == 1)
            ).scalar()
            if first_s is None:
                conn.execute(book_state_t.insert().values(id=1, first_interval_start_s=first_open_start_s))
                first_s = first_open_start_s
        self._read_counters()
        return BookState(self._last_seq, int(first_s), self._last_frozen_start_s)

    def hold_writer_lock(self, timeout_s: float = 15.0) -> None:
        """Become the book's only writer (for the life of the process), or raise RuntimeError after `timeout_s`.

        PostgreSQL: a session advisory lock per schema, held by one checked-out
        connection. SQLite: an exclusive lock on a file beside the database.
        Both vanish with the process, so a killed writer never blocks its successor.
        """
        deadline = time.monotonic() + timeout_s
        if self.engine.dialect.name == "sqlite":
            database = self.engine.url.database or ""
            if not database or database == ":memory:":
                return
            handle = open(f"{database}.writer-lock", "a+")  # noqa: SIM115 - held open for the process's life
            while True:
                try:
                    fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                    self._lock_handle: Any = handle
                    return
                except BlockingIOError:
                    if time.monotonic() >= deadline:
                        handle.close()
                        raise RuntimeError(f"another order book writes {database}") from None
                    time.sleep(0.2)
        conn = self.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        while True:
            locked = conn.exec_driver_sql(
                "SELECT pg_try_advisory_lock(hashtext('p2pgrid.order_book:' || current_schema()))"
            ).scalar()
            if locked:
                self._lock_handle = conn
                return
            if time.monotonic() >= deadline:
                conn.close()
                raise RuntimeError("another order book writes this database schema")
            time.sleep(0.2)

    def close(self) -> None:
        """Return the writer's driver connection."""
        if self._raw is not None:
            self._raw.close()
            self._raw = None

    def release_writer_lock(self) -> None:
        handle = getattr(self, "_lock_handle", None)
        if handle is not None:
            handle.close()
            self._lock_handle = None

    # Participants and meters.

    def load_participants(self) -> list[Participant]:
        with self.engine.connect() as conn:
            rows = conn.execute(select(participants_t)).all()
        return [
            Participant(r.participant_id, bytes(r.public_key), r.node_id, r.display_name, r.registered_at_s)
            for r in rows
        ]

    def register_participant(self, participant: Participant) -> Participant:
        """Store a participant; a repeat at the same node returns the stored one, another node is ALREADY_EXISTS."""
        with self.engine.begin() as conn:
            row = conn.execute(
                select(participants_t).where(participants_t.c.participant_id == participant.participant_id)
            ).first()
            if row is None:
                conn.execute(
                    participants_t.insert().values(
                        participant_id=participant.participant_id,
                        public_key=participant.public_key,
                        node_id=participant.node_id,
                        display_name=participant.display_name,
                        registered_at_s=participant.registered_at_s,
                    )
                )
                return participant
        if row.node_id != participant.node_id:
            raise AlreadyExists(
                f"participant {participant.participant_id} is registered at node {row.node_id!r}",
                field="node_id",
            )
        return Participant(
            row.participant_id, bytes(row.public_key), row.node_id, row.display_name, row.registered_at_s
        )

    def register_meter(self, meter: Meter) -> Meter:
        with self.engine.begin() as conn:
            row = conn.execute(select(meters_t).where(meters_t.c.meter_id == meter.meter_id)).first()
            if row is None:
                conn.execute(
                    meters_t.insert().values(
                        meter_id=meter.meter_id,
                        participant_id=meter.participant_id,
                        node_id=meter.node_id,
                        registered_at_s=meter.registered_at_s,
                    )
                )
                return meter
        if (row.participant_id, row.node_id) != (meter.participant_id, meter.node_id):
            raise AlreadyExists(
                f"meter {meter.meter_id!r} belongs to {row.participant_id} at node {row.node_id!r}",
                field="meter_id",
            )
        return Meter(row.meter_id, row.participant_id, row.node_id, row.registered_at_s)

    def list_meters(self, participant_id: str | None) -> list[Meter]:
        query = select(meters_t).order_by(meters_t.c.meter_id)
        if participant_id is not None:
            query = query.where(meters_t.c.participant_id == participant_id)
        with self.engine.connect() as conn:
            rows = conn.execute(query).all()
        return [Meter(r.meter_id, r.participant_id, r.node_id, r.registered_at_s) for r in rows]

    # The writer.

    def apply_ops(self, ops: Sequence[Op], now_s: float) -> WriteOutcome:
        """Apply `ops` in order in one transaction; each op's result slot is filled. Raises on database failure.

        The last sequence and the last frozen interval are kept in memory
        between transactions (this process is the book's only writer, see
        `hold_writer_lock`) and only advance once a transaction committed.
        A group of placements alone (the hot path) runs on a driver
        connection the writer keeps, without SQLAlchemy's per-transaction work.
        """
        if self._resync:
            self._read_counters()
        try:
            if not self.publish_order_events and all(isinstance(op, PlaceOp) for op in ops):
                return self._apply_placements(ops, now_s)
            return self._apply_any(ops, now_s)
        except BaseException:
            # A commit that failed may still have happened (a connection lost after COMMIT was sent):
            # read the counters back before handing out the next sequence.
            self._resync = True
            raise

    def _read_counters(self) -> None:
        with self.engine.connect() as conn:
            last_seq = conn.execute(select(func.max(orders_t.c.book_seq))).scalar()
            last_frozen = conn.execute(select(func.max(intervals_t.c.interval_start_s))).scalar()
        self._last_seq = int(last_seq or 0)
        self._last_frozen_start_s = None if last_frozen is None else int(last_frozen)
        self._resync = False

    def _apply_any(self, ops: Sequence[Op], now_s: float) -> WriteOutcome:
        with self.engine.begin() as conn:
            cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            txn = _Txn(conn, cursor, now_s, self._last_seq, self._last_frozen_start_s)
            self._prefetch(txn, ops)
            for op in ops:
                if isinstance(op, PlaceOp):
                    self._place_all(txn, op)
                elif isinstance(op, AmendOp):
                    self._flush(txn)
                    op.result = self._amend(txn, op)
                elif isinstance(op, CancelOp):
                    self._flush(txn)
                    op.result = self._cancel(txn, op)
                else:
                    self._flush(txn)
                    op.result = self._freeze(txn, op.interval_start_s)
            self._flush(txn)
        return self._committed(txn)

    def _apply_placements(self, ops: Sequence[Op], now_s: float) -> WriteOutcome:
        if self._raw is None:
            self._raw = self.engine.raw_connection()
        raw = self._raw
        cursor = raw.cursor()
        try:
            if not self._postgres:
                # The driver runs in autocommit mode (see make_engine): open the transaction ourselves.
                cursor.execute("BEGIN IMMEDIATE")
            txn = _Txn(None, cursor, now_s, self._last_seq, self._last_frozen_start_s)
            self._prefetch(txn, ops)
            for op in ops:
                assert isinstance(op, PlaceOp)
                self._place_all(txn, op)
            self._flush(txn)
            if self._postgres:
                raw.commit()
            else:
                cursor.execute("COMMIT")
        except BaseException:
            # The connection may be broken or mid-transaction: drop it rather than guess its state.
            self._raw = None
            try:
                cursor.close()
                raw.invalidate()
            except Exception:
                log.debug("dropping the writer connection failed", exc_info=True)
            raise
        cursor.close()
        return self._committed(txn)

    def _next_id(self) -> str:
        if not self._ids:
            self._ids = self._id_maker.take(256)
            self._ids.reverse()
        return self._ids.pop()

    def _committed(self, txn: _Txn) -> WriteOutcome:
        self._last_seq = txn.last_seq
        self._last_frozen_start_s = txn.last_frozen_start_s
        return txn.outcome

    def _place_all(self, txn: _Txn, op: PlaceOp) -> None:
        op.results = [
            self._place(txn, op.participant_id, order, prefix)
            for order, prefix in zip(op.orders, op.prefixes, strict=True)
        ]

    def _prefetch(self, txn: _Txn, ops: Sequence[Op]) -> None:
        """Load the stored orders of every (participant, client_order_id) the ops name, a few hundred per query.

        The query asks for participant IN (...) AND client_order_id IN (...),
        which both databases answer from the unique index; rows of the cross
        product that nobody asked for are dropped.
        """
        keys: set[tuple[str, str]] = set()
        for op in ops:
            if isinstance(op, PlaceOp):
                participant_id = op.participant_id
                keys.update((participant_id, o.body.client_order_id) for o in op.orders)
            elif isinstance(op, AmendOp):
                keys.add((op.participant_id, op.replacement.body.client_order_id))
        ordered = sorted(keys)
        for start in range(0, len(ordered), _IN_CHUNK):
            chunk = ordered[start : start + _IN_CHUNK]
            participants = sorted({p for p, _c in chunk})
            client_ids = sorted({c for _p, c in chunk})
            if self._postgres:
                # Planned for each call's arrays, never prepared: the writer's connection lives for the
                # process, and a prepared plan made while the book was small (a sequential scan) would
                # be kept while the book grows, as inserts do not make PostgreSQL plan again.
                txn.cursor.execute(self._prefetch_sql, (participants, client_ids), prepare=False)
            else:
                sql = self._prefetch_sql.format(
                    participants=",".join("?" * len(participants)), client_ids=",".join("?" * len(client_ids))
                )
                txn.cursor.execute(sql, (*participants, *client_ids))
            for row in txn.cursor.fetchall():
                known = dict(zip(_PREFETCH_COLUMNS, row, strict=True))
                key = (known["participant_id"], known["client_order_id"])
                if key in keys:
                    txn.known[key] = known

    def _closed(self, txn: _Txn, interval_start_s: int) -> bool:
        frozen = txn.last_frozen_start_s is not None and interval_start_s <= txn.last_frozen_start_s
        return frozen or self.rules.is_closed(interval_start_s, txn.now_s)

    def _place(
        self, txn: _Txn, participant_id: str, order: SignedOrder, prefix: str, replaces: str | None = None
    ) -> Receipt | DomainError:
        body = order.body
        key = (participant_id, body.client_order_id)
        known = txn.known.get(key)
        if known is not None:
            if _same_body(known, body):
                return _receipt_of(known)
            return AlreadyExists(
                f"client_order_id {body.client_order_id!r} was used for a different order "
                f"({_receipt_of(known).order_id}); client order ids are unique for ever",
                field=f"{prefix}.client_order_id",
            )
        if self._closed(txn, body.interval_start_s):
            return self.rules.closed_error(body.interval_start_s, f"{prefix}.interval_start_s")
        txn.last_seq += 1
        order_id = self._next_id()
        row = (
            txn.last_seq,
            order_id,
            participant_id,
            body.client_order_id,
            int(body.side),
            body.node_id,
            body.interval_start_s,
            body.energy_wh,
            body.price_micro_per_kwh,
            order.signature,
            _LIVE,
            txn.now_int_s,
            replaces,
        )
        txn.known[key] = dict(zip(_INSERT_COLUMNS, row, strict=True))
        txn.pending.append(row)
        txn.outcome.placed[body.side] += 1
        _count_live(txn, body.interval_start_s, 1)
        return Receipt(order_id, body.client_order_id, txn.last_seq, txn.now_int_s)

    def _flush(self, txn: _Txn) -> None:
        if not txn.pending:
            return
        if self._postgres and len(txn.pending) >= _COPY_MIN_ROWS:
            # COPY moves a batch into PostgreSQL at about twice the rate of executemany.
            with txn.cursor.copy(self._copy_sql) as copy:
                for row in txn.pending:
                    copy.write_row(row)
        else:
            txn.cursor.executemany(self._insert_sql, txn.pending)
        if self.publish_order_events:
            for row in txn.pending:
                mapping = dict(zip(_INSERT_COLUMNS, row, strict=True))
                kind = (
                    events_pb2.ORDER_EVENT_KIND_AMENDED
                    if mapping["replaces_order_id"]
                    else events_pb2.ORDER_EVENT_KIND_PLACED
                )
                self._order_event(txn, mapping, kind)
        txn.pending = []

    def _order_event(self, txn: _Txn, row: Row, kind: int) -> None:
        order_id = row["order_id"]
        event_id = f"order-{order_id}-{kind}"
        event = events_pb2.OrderEvent(
            header=events_pb2.EventHeader(
                event_id=event_id, emitted_at_ms=int(txn.now_s * 1000), producer=PRODUCER
            ),
            kind=kind,  # type: ignore[arg-type]
            order=_clearing_order(row),
            interval_start_s=row["interval_start_s"],
        )
        add_to_outbox(
            txn.conn, keyed(ORDER_EVENTS, row["interval_start_s"]), event.SerializeToString(), event_id
        )
        txn.outcome.outbox_events += 1

    def _own_order(self, txn: _Txn, participant_id: str, order_id: str) -> Any:
        return txn.conn.execute(
            select(*_ORDER_COLUMNS).where(
                orders_t.c.order_id == order_id, orders_t.c.participant_id == participant_id
            )
        ).first()

    def _check_changeable(self, txn: _Txn, row: Any, field: str) -> DomainError | None:
        if row.state in (OrderState.FROZEN, OrderState.FILLED) or self._closed(txn, row.interval_start_s):
            return self.rules.closed_error(row.interval_start_s, field)
        return None

    def _cancel(self, txn: _Txn, op: CancelOp) -> OrderRecord | DomainError:
        row = self._own_order(txn, op.participant_id, op.order_id)
        if row is None:
            return NotFound(f"no order {op.order_id!r}", field="order_id")
        record = _record(row)
        if record.state == OrderState.CANCELLED:
            return record
        error = self._check_changeable(txn, row, "order_id")
        if error is not None:
            return error
        txn.conn.execute(
            update(orders_t)
            .where(orders_t.c.book_seq == row.book_seq)
            .values(state=int(OrderState.CANCELLED))
        )
        if self.publish_order_events:
            self._order_event(txn, row._mapping, events_pb2.ORDER_EVENT_KIND_CANCELLED)
        return dataclasses.replace(record, state=OrderState.CANCELLED)

    def _amend(self, txn: _Txn, op: AmendOp) -> Receipt | DomainError:
        body = op.replacement.body
        known = txn.known.get((op.participant_id, body.client_order_id))
        if known is not None:
            if _same_body(known, body) and known["replaces_order_id"] == op.order_id:
                return _receipt_of(known)
            return AlreadyExists(
                f"client_order_id {body.client_order_id!r} was used for a different order "
                f"({known['order_id']}); client order ids are unique for ever",
                field="replacement.body.client_order_id",
            )
        row = self._own_order(txn, op.participant_id, op.order_id)
        if row is None:
            return NotFound(f"no order {op.order_id!r}", field="order_id")
        if row.state == OrderState.CANCELLED:
            return FailedPrecondition(
                f"order {op.order_id} is cancelled; place a new order", field="order_id"
            )
        error = self._check_changeable(txn, row, "order_id")
        if error is not None:
            return error
        receipt = self._place(
            txn, op.participant_id, op.replacement, "replacement.body", replaces=op.order_id
        )
        if isinstance(receipt, DomainError):
            return receipt
        self._flush(txn)
        txn.conn.execute(
            update(orders_t)
            .where(orders_t.c.book_seq == row.book_seq)
            .values(state=int(OrderState.CANCELLED), replaced_by_order_id=receipt.order_id)
        )
        _count_live(txn, row.interval_start_s, -1)
        if self.publish_order_events:
            self._order_event(txn, row._mapping, events_pb2.ORDER_EVENT_KIND_CANCELLED)
        return receipt

    def _freeze(self, txn: _Txn, interval_start_s: int) -> IntervalClosed | None:
        if txn.last_frozen_start_s is not None and interval_start_s <= txn.last_frozen_start_s:
            return None
        book_seq_max = txn.last_seq
        live = and_(
            orders_t.c.interval_start_s == interval_start_s,
            orders_t.c.state == int(OrderState.LIVE),
            orders_t.c.book_seq <= book_seq_max,
        )
        rows = txn.conn.execute(select(*_ORDER_COLUMNS).where(live).order_by(orders_t.c.book_seq)).all()
        txn.conn.execute(update(orders_t).where(live).values(state=int(OrderState.FROZEN)))
        gate_s = self.rules.gate_time_s(interval_start_s)
        txn.conn.execute(
            intervals_t.insert().values(
                interval_start_s=interval_start_s,
                gate_closure_s=gate_s,
                book_seq_max=book_seq_max,
                frozen_at_s=txn.now_s,
                orders_frozen=len(rows),
            )
        )
        event_id = clearing_request_event_id(interval_start_s)
        request = events_pb2.ClearingRequest(
            header=events_pb2.EventHeader(
                event_id=event_id, emitted_at_ms=int(txn.now_s * 1000), producer=PRODUCER
            ),
            interval=common_pb2.Interval(start_s=interval_start_s, length_s=self.rules.interval_s),
            book_seq_max=book_seq_max,
            orders=[_clearing_order(row._mapping) for row in rows],
        )
        add_to_outbox(
            txn.conn, keyed(CLEARING_REQUEST, interval_start_s), request.SerializeToString(), event_id
        )
        txn.outcome.outbox_events += 1
        txn.last_frozen_start_s = interval_start_s
        closed = IntervalClosed(interval_start_s, book_seq_max, len(rows))
        txn.outcome.closed.append(closed)
        return closed

    # Reads.

    def get_order(self, participant_id: str, order_id: str) -> OrderRecord | None:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(*_ORDER_COLUMNS).where(
                    orders_t.c.order_id == order_id, orders_t.c.participant_id == participant_id
                )
            ).first()
        return None if row is None else _record(row)

    def list_orders(
        self, participant_id: str, interval_start_s: int, after_book_seq: int, limit: int
    ) -> list[OrderRecord]:
        query = select(*_ORDER_COLUMNS).where(
            orders_t.c.participant_id == participant_id, orders_t.c.book_seq > after_book_seq
        )
        if interval_start_s:
            query = query.where(orders_t.c.interval_start_s == interval_start_s)
        with self.engine.connect() as conn:
            rows = conn.execute(query.order_by(orders_t.c.book_seq).limit(limit)).all()
        return [_record(row) for row in rows]

    def fill_marks_after(self, after_fill_seq: int) -> dict[str, int]:
        """Per participant, the newest fill_seq of the fills after `after_fill_seq` (one grouped query)."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(fills_t.c.participant_id, func.max(fills_t.c.fill_seq))
                .where(fills_t.c.fill_seq > after_fill_seq)
                .group_by(fills_t.c.participant_id)
            ).all()
        return {participant_id: int(seq) for participant_id, seq in rows}

    def fills_after(self, participant_id: str, after_fill_seq: int, limit: int) -> list[Fill]:
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(fills_t)
                .where(fills_t.c.participant_id == participant_id, fills_t.c.fill_seq > after_fill_seq)
                .order_by(fills_t.c.fill_seq)
                .limit(limit)
            ).all()
        return [
            Fill(
                r.fill_seq,
                r.order_id,
                r.participant_id,
                r.client_order_id,
                r.interval_start_s,
                Side(r.side),
                r.node_id,
                r.energy_wh,
                r.accepted_wh,
                r.price_micro_per_kwh,
            )
            for r in rows
        ]

    def live_orders_by_interval(self) -> dict[int, int]:
        """Live orders per interval, for the gauge at start."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(orders_t.c.interval_start_s, func.count())
                .where(orders_t.c.state == int(OrderState.LIVE))
                .group_by(orders_t.c.interval_start_s)
            ).all()
        return {int(start_s): int(count) for start_s, count in rows}

    def recent_interval_events(self, limit: int) -> list[MarketEvent]:
        """The newest `limit` frozen intervals as closed (and cleared) events, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(intervals_t).order_by(intervals_t.c.interval_start_s.desc()).limit(limit)
            ).all()
        events: list[MarketEvent] = []
        for row in reversed(rows):
            events.append(IntervalClosed(row.interval_start_s, row.book_seq_max, row.orders_frozen))
            if row.cleared_at_s is not None:
                prices = json.loads(row.node_prices_json or "{}")
                events.append(
                    IntervalCleared(
                        row.interval_start_s, tuple(sorted(prices.items())), int(row.volume_wh or 0)
                    )
                )
        return events

    # Clearing results.

    def apply_clearing_result(
        self, conn: Connection, event_id: str, payload: bytes
    ) -> tuple[IntervalCleared, int] | None:
        """Turn one ClearingResultEvent into fills in the caller's transaction; None if it is not applied.

        Returns the interval's market data and the number of fills stored.
        """
        try:
            event = events_pb2.ClearingResultEvent.FromString(payload)
        except DecodeError:
            # A message that cannot be read would be redelivered for ever: record it as seen and log it.
            log.error("a clearing result that is not a ClearingResultEvent", extra={"event_id": event_id})
            return None
        result = event.result
        interval_start_s = result.interval.start_s
        interval = conn.execute(
            select(intervals_t).where(intervals_t.c.interval_start_s == interval_start_s)
        ).first()
        if interval is None:
            log.error(
                "clearing result for an interval that was never frozen", extra={"interval": interval_start_s}
            )
            return None
        if interval.cleared_at_s is not None:
            log.warning(
                "a second clearing result for an interval; the first one stands",
                extra={"interval": interval_start_s, "event_id": event_id, "first": interval.result_event_id},
            )
            return None
        rows = conn.execute(
            select(*_ORDER_COLUMNS).where(
                orders_t.c.interval_start_s == interval_start_s,
                orders_t.c.state == int(OrderState.FROZEN),
            )
        ).all()
        frozen = [
            FrozenOrder(
                r.order_id,
                r.participant_id,
                r.client_order_id,
                r.node_id,
                Side(r.side),
                r.energy_wh,
                r.book_seq,
            )
            for r in rows
        ]
        try:
            outcome = fills_from_result(
                interval_start_s,
                interval.book_seq_max,
                frozen,
                result.book_seq_max,
                ((n.node_id, n.price_micro_per_kwh) for n in result.nodes),
                ((a.order_id, a.accepted_wh) for a in result.orders),
            )
        except ClearingResultRejected as exc:
            log.error("clearing result rejected: %s", exc, extra={"event_id": event_id})
            return None
        self._store_fills(conn, interval_start_s, event_id, outcome)
        if outcome.foreign_allocations:
            log.info(
                "clearing result allocates to %d orders outside the book (standing orders)",
                outcome.foreign_allocations,
                extra={"interval": interval_start_s},
            )
        cleared = IntervalCleared(
            interval_start_s, tuple(sorted(outcome.node_prices.items())), outcome.volume_wh
        )
        return cleared, len(outcome.fills)

    def _store_fills(
        self, conn: Connection, interval_start_s: int, event_id: str, outcome: IntervalOutcome
    ) -> None:
        now = time.time()
        if outcome.fills:
            conn.execute(
                fills_t.insert(),
                [
                    {
                        "participant_id": f.participant_id,
                        "order_id": f.order_id,
                        "client_order_id": f.client_order_id,
                        "interval_start_s": interval_start_s,
                        "side": int(f.side),
                        "node_id": f.node_id,
                        "energy_wh": f.energy_wh,
                        "accepted_wh": f.accepted_wh,
                        "price_micro_per_kwh": f.price_micro_per_kwh,
                        "created_at_s": now,
                    }
                    for f in outcome.fills
                ],
            )
            conn.execute(
                update(orders_t)
                .where(orders_t.c.order_id == bindparam("b_order_id"))
                .values(
                    state=int(OrderState.FILLED),
                    accepted_wh=bindparam("b_accepted_wh"),
                    fill_price_micro_per_kwh=bindparam("b_price"),
                ),
                [
                    {
                        "b_order_id": f.order_id,
                        "b_accepted_wh": f.accepted_wh,
                        "b_price": f.price_micro_per_kwh,
                    }
                    for f in outcome.fills
                ],
            )
        conn.execute(
            update(intervals_t)
            .where(intervals_t.c.interval_start_s == interval_start_s)
            .values(
                cleared_at_s=now,
                volume_wh=outcome.volume_wh,
                node_prices_json=json.dumps(outcome.node_prices, sort_keys=True),
                result_event_id=event_id,
            )
        )


def _count_live(txn: _Txn, interval_start_s: int, change: int) -> None:
    delta = txn.outcome.live_delta
    delta[interval_start_s] = delta.get(interval_start_s, 0) + change


def clearing_request_event_id(interval_start_s: int) -> str:
    """The event id (and Nats-Msg-Id) of an interval's clearing request: one per interval, for ever."""
    return f"clearing-request-{interval_start_s}"


def _clearing_order(row: Row) -> common_pb2.ClearingOrder:
    return common_pb2.ClearingOrder(
        order_id=row["order_id"],
        participant_id=row["participant_id"],
        node_id=row["node_id"],
        side=row["side"],
        energy_wh=row["energy_wh"],
        price_micro_per_kwh=row["price_micro_per_kwh"],
        book_seq=row["book_seq"],
    )
