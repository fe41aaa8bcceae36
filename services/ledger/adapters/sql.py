"""The ledger's storage on SQLAlchemy Core (SQLite by default, PostgreSQL in production) and its Python API.

`LedgerStore` is what the service calls:

- writes: `apply_transfers` (a batch of transfers), `settle_interval` (one
  interval from its clearing result and meter energy);
- for the event consumer: `stage_clearing`, `stage_meter_readings` (meter by
  meter) and `stage_meter_energy` (per participant), called in the
  consumer's transaction next to its inbox row as events arrive, and
  `settle_due`, called periodically, which settles every held interval whose
  clearing result is in and whose metering deadline has passed (optionally
  adding outbox events in each settlement's transaction);
- reads: `balance`, `balances`, `statement`, `transfer`, `transfers_in_range`,
  `receipt`, `checkpoints`, `latest_checkpoint`, `consistency_proof`,
  `settled_revisions`;
- `verify`, which re-derives the whole ledger from its rows.

Every write runs in one database transaction, the caller's when a
`connection` is passed (`with store.transaction() as conn: ...`), else its
own. A batch appends its transfers and their chain rows, updates the account
totals, checks that all balances sum to zero (BalanceInvariantError if not:
the service must stop), stores the Merkle nodes it completed and ends with a
signed checkpoint.

The write path streams: a settlement's transfers are built in chunks of 256
in their final order, and a helper thread makes the rows while this thread
inserts them: first the transfers, chunk by chunk (multi-row INSERTs on
SQLite, one COPY on PostgreSQL); then the account totals; then the chain
rows, which the database makes from the transfers just inserted and the
chunk's hashes passed as two byte strings, chunk by chunk as they are hashed.
SQLite releases the GIL while it inserts and PostgreSQL inserts in its own
process, so with a free core the building and hashing overlap the
inserting. The store keeps the chain head, the Merkle frontier and the
account totals in memory and re-reads them whenever the database's chain
head is not the one it last wrote (another writer, or a caller's transaction
that rolled back).

The database refuses UPDATE and DELETE on the append-only tables (triggers
created by the migration), and `verify` re-derives everything from the rows,
so a change made behind the ledger's back is found.
"""

from __future__ import annotations

import functools
import gc
import itertools
import json
import multiprocessing
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from nacl.signing import SigningKey
from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    String,
    Table,
    Text,
    exc,
    select,
)
from sqlalchemy.dialects import postgresql, sqlite

from services.domain.intervals import Clock, RealClock
from services.ledger.domain.audit import AuditReport, LedgerAuditor, RangeResult, VerificationError
from services.ledger.domain.chain import leaves_and_heads
from services.ledger.domain.checkpoint import NO_PREVIOUS, Checkpoint, sign_checkpoint
from services.ledger.domain.hashing import native
from services.ledger.domain.ledger import (
    AccountTotals,
    GroupTotals,
    LedgerError,
    Status,
    Transfer,
    TransferError,
    check_balance_sum,
    plan_batch,
)
from services.ledger.domain.merkle import (
    HASH_SIZE,
    MerkleFrontier,
    ProofError,
    consistency_proof,
    inclusion_proof,
    root_of,
)
from services.ledger.domain.outcomes import (
    AccountBalance,
    BatchOutcome,
    SettledRevision,
    SettlementOutcome,
    SettlementStatus,
    StatementLine,
    StoredTransfer,
)
from services.ledger.domain.receipt import Receipt
from services.ledger.domain.settlement import (
    ClearingResult,
    MeterEnergy,
    MeterQuality,
    MeterReading,
    SettlementConflictError,
    SettlementInputError,
    SettlementInputs,
    SettlementRules,
    clearing_from_json,
    clearing_to_json,
    estimated_participants,
    first_settlement_chunks,
    first_settlement_transfers,
    initial_meter_state,
    meter_state_from_json,
    meter_state_to_json,
    participant_energy,
    plan_resettlement,
    plan_restaged_settlement,
    settlement_due_s,
    validate_inputs,
    validate_interval,
    validate_meter_energy,
    validate_meter_readings,
    validate_rows,
)
from services.platform.db import migrate

NODE_MIN_LEVEL = 8
"""Perfect Merkle subtrees of 2^8 = 256 leaves and up are stored, so a proof reads at most 2·256 leaf hashes."""
DEFAULT_ORIGIN = "p2pgrid-ledger"
VERSION_TABLE = "alembic_version_ledger"
MIGRATIONS = "services.ledger.adapters.migrations"

_SEQ = BigInteger().with_variant(Integer(), "sqlite")
metadata = MetaData()
accounts_table = Table(
    "accounts",
    metadata,
    Column("account_id", String(128), primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("debits_nano", BigInteger(), nullable=False),
    Column("credits_nano", BigInteger(), nullable=False),
)
transfers_table = Table(
    "transfers",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=False),
    Column("transfer_id", String(64), nullable=False, unique=True),
    Column("debit_account", String(128), nullable=False),
    Column("credit_account", String(128), nullable=False),
    Column("amount_nano", BigInteger(), nullable=False),
    Column("code", String(32), nullable=False),
    Column("interval_start_s", BigInteger(), nullable=False),
    Column("linked_group", String(64), nullable=False),
    Column("flags", SmallInteger(), nullable=False),
)
chain_table = Table(
    "chain",
    metadata,
    Column("seq", _SEQ, primary_key=True, autoincrement=False),
    Column("transfer_id", String(64), nullable=False),
    Column("entry_hash", LargeBinary(), nullable=False),
    Column("chained_hash", LargeBinary(), nullable=False),
)
merkle_nodes_table = Table(
    "merkle_nodes",
    metadata,
    Column("level", SmallInteger(), primary_key=True),
    Column("node_index", BigInteger(), primary_key=True),
    Column("hash", LargeBinary(), nullable=False),
)
checkpoints_table = Table(
    "checkpoints",
    metadata,
    Column("tree_size", BigInteger(), primary_key=True, autoincrement=False),
    Column("origin", String(100), nullable=False),
    Column("root_hash", LargeBinary(), nullable=False),
    Column("chain_head", LargeBinary(), nullable=False),
    Column("time_ms", BigInteger(), nullable=False),
    Column("previous_hash", LargeBinary(), nullable=False),
    Column("public_key", LargeBinary(), nullable=False),
    Column("signature", LargeBinary(), nullable=False),
    Column("frontier", LargeBinary(), nullable=False),
)
settled_intervals_table = Table(
    "settled_intervals",
    metadata,
    Column("market_id", String(100), primary_key=True),
    Column("interval_start_s", BigInteger(), primary_key=True, autoincrement=False),
    Column("revision", Integer(), primary_key=True, autoincrement=False),
    Column("interval_s", Integer(), nullable=False),
    Column("clearing_digest", String(64), nullable=False),
    Column("rules_json", Text(), nullable=False),
    Column("meter_json", Text(), nullable=False),
    Column("estimated_count", Integer(), nullable=False),
    Column("first_seq", BigInteger(), nullable=False),
    Column("transfer_count", Integer(), nullable=False),
    Column("tree_size", BigInteger(), nullable=False),
    Column("settled_at_ms", BigInteger(), nullable=False),
)

staged_clearings_table = Table(
    "staged_clearings",
    metadata,
    Column("market_id", String(100), primary_key=True),
    Column("interval_start_s", BigInteger(), primary_key=True, autoincrement=False),
    Column("interval_s", Integer(), nullable=False),
    Column("clearing_digest", String(64), nullable=False),
    Column("clearing_json", Text(), nullable=False),
    Column("received_at_ms", BigInteger(), nullable=False),
)
staged_meter_energy_table = Table(
    "staged_meter_energy",
    metadata,
    Column("market_id", String(100), primary_key=True),
    Column("interval_start_s", BigInteger(), primary_key=True, autoincrement=False),
    Column("participant_id", String(100), primary_key=True),
    Column("import_wh", BigInteger(), nullable=False),
    Column("export_wh", BigInteger(), nullable=False),
    Column("quality", SmallInteger(), nullable=False),
    Column("received_at_ms", BigInteger(), nullable=False),
)
staged_meter_readings_table = Table(
    "staged_meter_readings",
    metadata,
    Column("market_id", String(100), primary_key=True),
    Column("interval_start_s", BigInteger(), primary_key=True, autoincrement=False),
    Column("meter_id", String(100), primary_key=True),
    Column("participant_id", String(100), nullable=False),
    Column("import_wh", BigInteger(), nullable=False),
    Column("export_wh", BigInteger(), nullable=False),
    Column("quality", SmallInteger(), nullable=False),
    Column("received_at_ms", BigInteger(), nullable=False),
)
pending_intervals_table = Table(
    "pending_intervals",
    metadata,
    Column("market_id", String(100), primary_key=True),
    Column("interval_start_s", BigInteger(), primary_key=True, autoincrement=False),
    Column("version", BigInteger(), nullable=False),
)

TRANSFER_COLUMNS = (
    "seq",
    "transfer_id",
    "debit_account",
    "credit_account",
    "amount_nano",
    "code",
    "interval_start_s",
    "linked_group",
    "flags",
)
CHAIN_COLUMNS = ("seq", "transfer_id", "entry_hash", "chained_hash")
_SETTLED_COLUMNS = (
    "market_id",
    "interval_start_s",
    "revision",
    "interval_s",
    "clearing_digest",
    "rules_json",
    "meter_json",
    "estimated_count",
    "first_seq",
    "transfer_count",
    "tree_size",
    "settled_at_ms",
)


class _LatestRevision(NamedTuple):
    """The settlement record of an interval's latest revision, as far as a new revision needs it."""

    revision: int
    clearing_digest: str
    rules_json: str
    meter_json: str
    tree_size: int


_CHECKPOINT_COLUMNS = (
    "tree_size",
    "origin",
    "root_hash",
    "chain_head",
    "time_ms",
    "previous_hash",
    "public_key",
    "signature",
    "frontier",
)
_NODE_COLUMNS = ("level", "node_index", "hash")


def migrate_ledger(engine: Engine) -> None:
    """Create or upgrade the ledger's tables and append-only rules."""
    migrate(engine, MIGRATIONS, VERSION_TABLE)


class LedgerCorruptError(LedgerError):
    """The stored ledger contradicts itself where the store reads it back; the service must stop."""


class SettlementError(LedgerError):
    """A settlement whose transfers the ledger refused (e.g. an id taken by another transfer)."""


class SettlementNotDueError(LedgerError):
    """The interval's metering deadline has not passed yet."""


class AccountNotFoundError(LedgerError, LookupError):
    pass


class TransferNotFoundError(LedgerError, LookupError):
    pass


# --------------------------------------------------------------------------- database specifics

CHUNK_TRANSFERS = 256
"""Transfers per chunk on their way to the database: one multi-row INSERT per chunk on SQLite."""

BatchItem = tuple[str, Any]
"""What the batch's Python work hands to the database, in order: ("transfers", rows) for each chunk,
("accounts", (rows, new accounts)) once every transfer is made, ("chain", rows) for each chunk once
it is hashed, then ("done", _Written)."""


@dataclass(slots=True)
class _Written:
    """The outcome of a batch's Python work: where the chain ends, the Merkle nodes, totals, checkpoint."""

    seq: int
    head: bytes
    frontier: MerkleFrontier
    completed: list[tuple[int, int, bytes]]
    totals: Mapping[str, AccountTotals]
    checkpoint: Checkpoint


def python_copy_rows(first_seq: int, transfers: Sequence[Sequence[Any]]) -> bytes:
    """PostgreSQL COPY text rows: each transfer's sequence number (from `first_seq`) and fields,
    tab-separated, one line each. No field is escaped: the caller passes none with a tab, newline or
    backslash."""
    return "".join(
        [
            f"{seq}\t{tid}\t{debit}\t{credit}\t{amount}\t{code}\t{start}\t{group}\t{flags}\n"
            for seq, (tid, debit, credit, amount, code, start, group, flags) in enumerate(
                transfers, first_seq
            )
        ]
    ).encode()


def copy_rows(first_seq: int, transfers: Sequence[Sequence[Any]]) -> bytes:
    """As `python_copy_rows`; compiled when built."""
    if native is not None:
        try:
            return native.copy_rows(first_seq, transfers)
        except (TypeError, OverflowError):
            pass
    return python_copy_rows(first_seq, transfers)


def _account_rows(totals: Mapping[str, AccountTotals]) -> list[tuple[str, str, int, int]]:
    """(id, kind, debits, credits) of each account in `totals`."""
    return [(a, a[: a.index(":")], t.debits_nano, t.credits_nano) for a, t in totals.items()]


class _Backend:
    """The statements that differ between SQLite and PostgreSQL, on the raw driver cursor."""

    placeholder = "?"

    def lock(self, conn: Connection) -> None:
        """Serialise writers; on SQLite the transaction's BEGIN IMMEDIATE already did."""

    def transfer_rows(self, first_seq: int, chunk: Sequence[Transfer]) -> Any:
        """A chunk of transfers in the form `write` inserts."""
        raise NotImplementedError

    def chain_rows(self, first_seq: int, leaves: bytes, heads: bytes) -> Any:
        """The chain rows of a chunk whose transfers were inserted (its entry and chained hashes, each
        joined into one byte string), in the form `write` inserts."""
        raise NotImplementedError

    def write(self, cursor: Any, batches: Iterator[list[BatchItem]]) -> _Written:
        """Insert the transfers, account totals and chain rows as `batches` deliver them (each batch
        all the items made since the last); return the final item."""
        raise NotImplementedError

    def insert_checkpoint(
        self, cursor: Any, row: tuple[Any, ...], nodes: Sequence[tuple[int, int, bytes]]
    ) -> None:
        """Store a batch's checkpoint row and the Merkle nodes (level, index, hash) it completed."""
        step = 10_000  # rows per statement, within SQLite's 32,766 parameters
        for i in range(0, len(nodes), step):
            part = nodes[i : i + step]
            cursor.execute(
                self.values_sql("merkle_nodes", _NODE_COLUMNS, len(part)), list(itertools.chain(*part))
            )
        cursor.execute(self.values_sql("checkpoints", _CHECKPOINT_COLUMNS, 1), row)

    def write_accounts(
        self, cursor: Any, rows: Sequence[tuple[str, str, int, int]], new_accounts: Sequence[str]
    ) -> None:
        """Store the new totals (id, kind, debits, credits) of the accounts a batch touched."""
        raise NotImplementedError

    def all_totals(self, cursor: Any) -> list[tuple[int, int]]:
        cursor.execute("SELECT debits_nano, credits_nano FROM accounts")
        return list(cursor.fetchall())

    def write_accounts_and_check(
        self, cursor: Any, rows: Sequence[tuple[str, str, int, int]], new_accounts: Sequence[str], seq: int
    ) -> None:
        """Store a batch's new account totals, then check that all balances sum to zero."""
        self.write_accounts(cursor, rows, new_accounts)
        check_balance_sum(self.all_totals(cursor), where=f"after the batch ending at seq {seq}")

    def values_sql(self, table: str, columns: Sequence[str], count: int, suffix: str = "") -> str:
        one = "(" + ",".join([self.placeholder] * len(columns)) + ")"
        return f"INSERT INTO {table} ({','.join(columns)}) VALUES " + ",".join([one] * count) + suffix


def _chain_rows_missing(table_rows: int, expected: int, first_seq: int) -> LedgerCorruptError:
    return LedgerCorruptError(
        f"chain rows from seq {first_seq}: {expected} transfers were inserted, {table_rows} found"
    )


def _runs(batches: Iterator[list[BatchItem]]) -> Iterator[tuple[str, list[Any]]]:
    """The payloads of consecutive items of one kind within each batch, with that kind."""
    for batch in batches:
        for kind, run in itertools.groupby(batch, key=_kind):
            yield kind, [payload for _, payload in run]


def _kind(item: BatchItem) -> str:
    return item[0]


class _SqliteBackend(_Backend):
    placeholder = "?"
    # Transfers go in as multi-row INSERTs, which bind whole chunks at once: ~1.5x the rows/s of
    # executemany with the same rows. A chunk's chain rows take their transfer ids from the
    # transfers just inserted and their hashes from two blobs of 32-byte hashes: four parameters
    # instead of four per row, so SQLite does the work (without the GIL) and this process only
    # joins the hashes.
    chain_sql = (
        "INSERT INTO chain (seq, transfer_id, entry_hash, chained_hash) "
        "SELECT seq, transfer_id, substr(?1, ((seq - ?3) << 5) + 1, 32), substr(?2, ((seq - ?3) << 5) + 1, 32) "
        "FROM transfers WHERE seq >= ?3 AND seq < ?4 ORDER BY seq"
    )

    def __init__(self) -> None:
        self._sql: dict[tuple[str, int], str] = {}

    def _insert_sql(self, table: str, columns: Sequence[str], count: int, suffix: str = "") -> str:
        key = (table + suffix, count)
        sql = self._sql.get(key)
        if sql is None:
            sql = self._sql[key] = self.values_sql(table, columns, count, suffix)
        return sql

    def _insert_rows(
        self, cursor: Any, table: str, columns: Sequence[str], params: list[Any], suffix: str = ""
    ) -> None:
        """Insert the rows whose parameters, one row after another, are `params`, in statements of a
        few fixed lengths: up to 13 × 256 rows, then a multiple of 16 and the rest (below 16).

        SQLite costs several times as much to prepare a multi-row INSERT as to
        run it, and the driver keeps prepared statements by their text; so only
        a few lengths may occur, and each is prepared once per connection. Each
        statement is one call, which leaves the GIL for the whole insert (row by
        row, `executemany` would take it back after every row)."""
        width = len(columns)
        rows = len(params) // width
        done = 0
        for piece in (CHUNK_TRANSFERS * 13, CHUNK_TRANSFERS, 16, 1):
            take = (rows - done) // piece * piece
            while take:
                now = min(take, 30_000 // width // piece * piece)
                cursor.execute(
                    self._insert_sql(table, columns, now, suffix), params[done * width : (done + now) * width]
                )
                done += now
                take -= now
        assert done == rows

    def transfer_rows(self, first_seq: int, chunk: Sequence[Transfer]) -> Any:
        # The statement's parameters, flattened here so that the inserting thread only binds them.
        params: list[Any] = []
        extend = params.extend
        seq = first_seq
        for t in chunk:
            params.append(seq)
            extend(t)
            seq += 1
        return len(chunk), params

    def chain_rows(self, first_seq: int, leaves: bytes, heads: bytes) -> Any:
        return (leaves, heads, first_seq, first_seq + len(leaves) // HASH_SIZE)

    def write(self, cursor: Any, batches: Iterator[list[BatchItem]]) -> _Written:
        execute = cursor.execute
        for kind, payloads in _runs(batches):
            if kind == "transfers":
                # The ready whole chunks in one statement (up to SQLite's limit of parameters), a
                # shorter chunk in statements of a few fixed lengths (see `_insert_rows`).
                full = [params for count, params in payloads if count == CHUNK_TRANSFERS]
                step = 30_000 // (len(TRANSFER_COLUMNS) * CHUNK_TRANSFERS)
                for i in range(0, len(full), step):
                    group = full[i : i + step]
                    execute(
                        self._insert_sql("transfers", TRANSFER_COLUMNS, CHUNK_TRANSFERS * len(group)),
                        group[0] if len(group) == 1 else list(itertools.chain(*group)),
                    )
                for count, params in payloads:
                    if count != CHUNK_TRANSFERS:
                        self._insert_rows(cursor, "transfers", TRANSFER_COLUMNS, params)
            elif kind == "chain":
                leaves, heads, first_seq, end_seq = (
                    payloads[0]
                    if len(payloads) == 1
                    else (
                        b"".join(p[0] for p in payloads),
                        b"".join(p[1] for p in payloads),
                        payloads[0][2],
                        payloads[-1][3],
                    )
                )
                execute(self.chain_sql, (leaves, heads, first_seq, end_seq))
                if cursor.rowcount != end_seq - first_seq:
                    raise _chain_rows_missing(cursor.rowcount, end_seq - first_seq, first_seq)
            elif kind == "accounts":
                for payload in payloads:
                    self.write_accounts_and_check(cursor, *payload)
            elif kind == "done":
                written: _Written = payloads[0]
                return written
        raise AssertionError("the batch ended without its final item")

    def all_totals(self, cursor: Any) -> list[tuple[int, int]]:
        # Summed by SQLite, whose integer SUM is exact or fails ("integer overflow") once a partial
        # sum leaves 64 bits; then the totals are summed here.
        try:
            cursor.execute(
                "SELECT COALESCE(SUM(debits_nano), 0), COALESCE(SUM(credits_nano), 0) FROM accounts"
            )
            debits, credits = cursor.fetchone()
        except sqlite3.OperationalError:
            return super().all_totals(cursor)
        return [(int(debits), int(credits))]

    def write_accounts(
        self, cursor: Any, rows: Sequence[tuple[str, str, int, int]], new_accounts: Sequence[str]
    ) -> None:
        suffix = (
            " ON CONFLICT(account_id) DO UPDATE SET "
            "debits_nano = excluded.debits_nano, credits_nano = excluded.credits_nano"
        )
        columns = ("account_id", "kind", "debits_nano", "credits_nano")
        self._insert_rows(cursor, "accounts", columns, list(itertools.chain.from_iterable(rows)), suffix)


def _array(values: Sequence[str] | Sequence[int]) -> str:
    """A PostgreSQL array literal of values that need no quoting (account ids, kinds, integers)."""
    return "{" + ",".join(map(str, values)) + "}"


class _PostgresBackend(_Backend):
    placeholder = "%s"
    # As on SQLite, a chunk's chain rows are made by the server from the transfers just copied and
    # two byte strings of hashes.
    chain_sql = (
        "INSERT INTO chain (seq, transfer_id, entry_hash, chained_hash) "
        "SELECT seq, transfer_id, substring(%(leaves)s::bytea from ((seq - %(first)s) * 32 + 1)::int for 32), "
        "substring(%(heads)s::bytea from ((seq - %(first)s) * 32 + 1)::int for 32) "
        "FROM transfers WHERE seq >= %(first)s AND seq < %(end)s ORDER BY seq"
    )

    def lock(self, conn: Connection) -> None:
        # One writer at a time per ledger (schema); readers are not blocked.
        conn.exec_driver_sql("LOCK TABLE chain IN SHARE ROW EXCLUSIVE MODE")

    # COPY's text format, written here a chunk at a time: half the client's work of psycopg's
    # `write_row`, which formats row by row. No field needs escaping: ids, accounts and codes match
    # their patterns (no tab, newline or backslash; checked for every transfer from outside, and the
    # settlement builds its own from checked names) and the rest are integers.
    def transfer_rows(self, first_seq: int, chunk: Sequence[Transfer]) -> Any:
        return copy_rows(first_seq, chunk)

    def chain_rows(self, first_seq: int, leaves: bytes, heads: bytes) -> Any:
        return {
            "leaves": leaves,
            "heads": heads,
            "first": first_seq,
            "end": first_seq + len(leaves) // HASH_SIZE,
        }

    def write(self, cursor: Any, batches: Iterator[list[BatchItem]]) -> _Written:
        # The transfers go in one COPY, chunk by chunk as they are made, so the server inserts them
        # while the next chunks are made; then the account totals and, as they are hashed, the chain
        # rows of the ready chunks in one statement.
        runs = _runs(batches)
        kind, payloads = next(runs)
        if kind == "transfers":
            with cursor.copy(f"COPY transfers ({','.join(TRANSFER_COLUMNS)}) FROM STDIN") as copy:
                while kind == "transfers":
                    copy.write(b"".join(payloads))
                    kind, payloads = next(runs)
        while kind != "done":
            if kind == "accounts":
                for payload in payloads:
                    self.write_accounts_and_check(cursor, *payload)
            elif kind == "chain":
                first_seq, end_seq = payloads[0]["first"], payloads[-1]["end"]
                params = (
                    payloads[0]
                    if len(payloads) == 1
                    else {
                        "leaves": b"".join(p["leaves"] for p in payloads),
                        "heads": b"".join(p["heads"] for p in payloads),
                        "first": first_seq,
                        "end": end_seq,
                    }
                )
                cursor.execute(self.chain_sql, params)
                if cursor.rowcount != end_seq - first_seq:
                    raise _chain_rows_missing(cursor.rowcount, end_seq - first_seq, first_seq)
            kind, payloads = next(runs)
        written: _Written = payloads[0]
        return written

    def insert_checkpoint(
        self, cursor: Any, row: tuple[Any, ...], nodes: Sequence[tuple[int, int, bytes]]
    ) -> None:
        # One statement, one round trip: the nodes (a few per batch) go in over arrays.
        if not nodes:
            super().insert_checkpoint(cursor, row, nodes)
            return
        levels, indexes, hashes = zip(*nodes, strict=True)
        cursor.execute(
            "WITH nodes AS (INSERT INTO merkle_nodes (level, node_index, hash) "
            "SELECT * FROM unnest(%s::smallint[], %s::bigint[], %s::bytea[])) "
            + self.values_sql("checkpoints", _CHECKPOINT_COLUMNS, 1),
            (list(levels), list(indexes), list(hashes), *row),
        )

    def write_accounts(
        self, cursor: Any, rows: Sequence[tuple[str, str, int, int]], new_accounts: Sequence[str]
    ) -> None:
        # New accounts are inserted, the others updated, each in one statement over arrays: a
        # thousand-row VALUES list costs the server twice as much to plan, and an UPDATE a third less
        # than INSERT … ON CONFLICT DO UPDATE. The arrays travel as array literals built here:
        # psycopg's list adapter quotes element by element in Python, which cost more than the rest
        # of the batch's statements together. No account id or kind holds a character that needs
        # quoting in an array literal.
        new = set(new_accounts)
        inserted = [r for r in rows if r[0] in new] if new else []
        updated = [r for r in rows if r[0] not in new] if new else rows
        if inserted:
            ids, kinds, debits, credits = zip(*inserted, strict=True)
            cursor.execute(
                "INSERT INTO accounts (account_id, kind, debits_nano, credits_nano) "
                "SELECT * FROM unnest(%s::text[], %s::text[], %s::bigint[], %s::bigint[])",
                (_array(ids), _array(kinds), _array(debits), _array(credits)),
            )
        if updated:
            ids, _kinds, debits, credits = zip(*updated, strict=True)
            cursor.execute(
                "UPDATE accounts SET debits_nano = u.debits_nano, credits_nano = u.credits_nano "
                "FROM unnest(%s::text[], %s::bigint[], %s::bigint[]) "
                "AS u(account_id, debits_nano, credits_nano) WHERE accounts.account_id = u.account_id",
                (_array(ids), _array(debits), _array(credits)),
            )
            if cursor.rowcount != len(updated):
                raise LedgerCorruptError(
                    f"{len(updated) - cursor.rowcount} of the accounts the ledger holds totals for are missing"
                )

    def all_totals(self, cursor: Any) -> list[tuple[int, int]]:
        # Summed in the database, exactly: SUM of bigint is numeric (accumulated in 128 bits), and
        # only one row travels.
        cursor.execute("SELECT COALESCE(SUM(debits_nano), 0), COALESCE(SUM(credits_nano), 0) FROM accounts")
        debits, credits = cursor.fetchone()
        return [(int(debits), int(credits))]


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector for one batch.

    A batch allocates hundreds of thousands of short-lived, acyclic objects
    (rows, hashes, tuples); reference counting frees them, and the cyclic
    collections they would trigger only re-scan the whole heap, at about a
    fifth of the batch's time. The collector runs again as soon as the batch ends.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _insert_for(conn: Connection, table: Table) -> Any:
    """An INSERT that can take ON CONFLICT, in the connection's dialect."""
    if conn.dialect.name == "postgresql":
        return postgresql.insert(table)
    return sqlite.insert(table)


def _raw_cursor(conn: Connection) -> Any:
    return conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]


_T = TypeVar("_T")


def _run_ahead(items: Iterator[_T]) -> Iterator[list[_T]]:
    """Iterate `items` in a helper thread; hand over, whenever this thread asks, all the items made since.

    The helper builds and hashes the next chunks while this thread waits for
    the database, which it does without holding the GIL. After each item the
    helper yields the GIL (`sleep(0)`), so that this thread gets it back
    without waiting out the interpreter's switch interval; it then takes every
    item that is ready, which the backend inserts in one statement where it
    can: so the inserts keep up with the helper instead of taking one turn
    each. An exception in the helper is raised here; if this side stops early,
    the helper stops after its current item.
    """
    handed: queue.SimpleQueue[tuple[bool, Any]] = queue.SimpleQueue()
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                handed.put((True, item))
                if stop.is_set():
                    break
                time.sleep(0)
            handed.put((False, None))
        except BaseException as error:  # handed to the consuming thread, which raises it
            handed.put((False, error))

    helper = threading.Thread(target=produce, name="ledger-batch", daemon=True)
    helper.start()
    try:
        ready: list[_T] = []
        while True:
            more, item = handed.get()
            while more:
                ready.append(item)
                try:
                    more, item = handed.get_nowait()
                except queue.Empty:
                    break
            if ready:
                yield ready
                ready = []
            if not more:
                if item is not None:
                    raise item
                return
    finally:
        stop.set()
        helper.join()


def _validated_after_first(
    chunks: Iterator[list[Transfer]], inputs: SettlementInputs
) -> Iterator[list[Transfer]]:
    """`chunks` of a first settlement, its input rows validated right after the first chunk is made
    (or when making it fails), so the database stores that chunk while the rows are checked."""
    try:
        first = next(chunks, None)
    except Exception:
        validate_rows(inputs)
        raise
    if first is not None:
        yield first
    validate_rows(inputs)
    yield from chunks


# --------------------------------------------------------------------------- the store


@dataclass(slots=True)
class _State:
    """What the store remembers between batches, valid while the database's chain head is `seq`/`head`."""

    seq: int
    head: bytes
    frontier: MerkleFrontier
    totals: dict[str, AccountTotals]
    checkpoint: Checkpoint | None


class LedgerStore:
    """The ledger on one database: writes batches and settlements, answers queries, verifies itself.

    Without a signing key the store is read-only: queries and `verify` work, writes raise LedgerError.
    """

    def __init__(
        self,
        engine: Engine,
        signing_key: SigningKey | None = None,
        *,
        origin: str = DEFAULT_ORIGIN,
        clock: Clock | None = None,
    ) -> None:
        self.engine = engine
        self.signing_key = signing_key
        self.origin = origin
        self.clock: Clock = clock or RealClock()
        self._backend: _Backend = (
            _PostgresBackend() if engine.dialect.name == "postgresql" else _SqliteBackend()
        )
        dbapi = engine.dialect.loaded_dbapi
        self._integrity_errors: tuple[type[BaseException], ...] = (exc.IntegrityError, dbapi.IntegrityError)
        self._state: _State | None = None
        self._lock = threading.RLock()
        self._last_rules: tuple[SettlementRules, str] | None = None

    def _rules_json(self, rules: SettlementRules) -> str:
        """`rules.to_json()`, remembered for the rules object last asked about (rules are immutable)."""
        last = self._last_rules
        if last is None or last[0] is not rules:
            last = self._last_rules = (rules, rules.to_json())
        return last[1]

    @property
    def public_key(self) -> bytes:
        if self.signing_key is None:
            raise LedgerError("this store has no signing key (read-only)")
        return bytes(self.signing_key.verify_key)

    def migrate(self) -> None:
        migrate_ledger(self.engine)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction to pass as `connection=`, e.g. to record an inbox row with the settlement."""
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _writing(self, connection: Connection | None) -> Iterator[Connection]:
        with self._lock, _gc_paused():
            if connection is not None:
                try:
                    yield connection
                except BaseException:
                    self._state = None
                    raise
                return
            try:
                with self.engine.begin() as conn:
                    yield conn
            except BaseException:
                self._state = None
                raise

    # ----------------------------------------------------------------- state

    def _read_head(self, conn: Connection) -> tuple[int, bytes]:
        cursor = _raw_cursor(conn)
        cursor.execute("SELECT seq, chained_hash FROM chain ORDER BY seq DESC LIMIT 1")
        row = cursor.fetchone()
        if row is None:
            return 0, NO_PREVIOUS
        return int(row[0]), bytes(row[1])

    def _state_for(self, conn: Connection) -> _State:
        """The cached state if the database's chain head is still ours, else reloaded from the database."""
        seq, head = self._read_head(conn)
        state = self._state
        if state is not None and state.seq == seq and state.head == head:
            return state
        self._state = None
        state = self._load_state(conn, seq, head)
        self._state = state
        return state

    def _load_state(self, conn: Connection, seq: int, head: bytes) -> _State:
        checkpoint, frontier_bytes = self._last_checkpoint(conn)
        if checkpoint is None:
            frontier = MerkleFrontier()
        else:
            try:
                frontier = MerkleFrontier.from_bytes(checkpoint.tree_size, frontier_bytes)
            except ValueError as e:
                raise LedgerCorruptError(f"checkpoint of size {checkpoint.tree_size}: {e}") from e
            if frontier.root() != checkpoint.root_hash:
                raise LedgerCorruptError(
                    f"checkpoint of size {checkpoint.tree_size}: stored frontier does not give the signed root"
                )
            if checkpoint.tree_size > seq:
                raise LedgerCorruptError(
                    f"checkpoint of size {checkpoint.tree_size} is beyond the chain ({seq})"
                )
            if checkpoint.tree_size == seq and checkpoint.chain_head != head:
                raise LedgerCorruptError(f"checkpoint of size {seq}: chain head differs from the chain")
        if frontier.size < seq:
            rows = conn.execute(
                select(chain_table.c.entry_hash)
                .where(chain_table.c.seq > frontier.size)
                .order_by(chain_table.c.seq)
            ).all()
            if len(rows) != seq - frontier.size:
                raise LedgerCorruptError(f"chain rows after {frontier.size} are not contiguous up to {seq}")
            frontier.extend([bytes(r[0]) for r in rows], 64, [])
        totals = {
            str(r[0]): AccountTotals(int(r[1]), int(r[2]))
            for r in conn.execute(
                select(
                    accounts_table.c.account_id, accounts_table.c.debits_nano, accounts_table.c.credits_nano
                )
            )
        }
        return _State(seq=seq, head=head, frontier=frontier, totals=totals, checkpoint=checkpoint)

    def _last_checkpoint(self, conn: Connection) -> tuple[Checkpoint | None, bytes]:
        row = conn.execute(
            select(checkpoints_table).order_by(checkpoints_table.c.tree_size.desc()).limit(1)
        ).first()
        if row is None:
            return None, b""
        return _checkpoint_from_row(row), bytes(row.frontier)

    # ----------------------------------------------------------------- writes

    def apply_transfers(
        self, transfers: Sequence[Transfer], *, connection: Connection | None = None
    ) -> BatchOutcome:
        """Apply a batch (see the guarantees in services.ledger.domain.ledger); ends with a checkpoint."""
        with self._writing(connection) as conn:
            return self._append(conn, transfers, checked=False)

    def _lookup(self, conn: Connection, ids: Sequence[str]) -> dict[str, tuple[int, Transfer]]:
        found: dict[str, tuple[int, Transfer]] = {}
        unique = list(dict.fromkeys(ids))
        t = transfers_table.c
        for i in range(0, len(unique), 500):
            rows = conn.execute(select(transfers_table).where(t.transfer_id.in_(unique[i : i + 500]))).all()
            for r in rows:
                found[r.transfer_id] = (int(r.seq), _transfer_from_row(r))
        return found

    def _append(self, conn: Connection, transfers: Sequence[Transfer], *, checked: bool) -> BatchOutcome:
        """The careful path: look every id up, plan the batch group by group, write what is new."""
        self._backend.lock(conn)
        state = self._state_for(conn)
        stored = self._lookup(conn, [t.transfer_id for t in transfers if isinstance(t.transfer_id, str)])
        plan = plan_batch(transfers, {k: v[1] for k, v in stored.items()}, state.totals, checked=checked)
        first_seq = state.seq + 1
        seq_of = {t.transfer_id: first_seq + i for i, t in enumerate(plan.appended)}
        seqs: list[int | None] = []
        for r in plan.results:
            if r.status is Status.REJECTED:
                seqs.append(None)
            elif r.transfer_id in seq_of:
                seqs.append(seq_of[r.transfer_id])
            else:
                seqs.append(stored[r.transfer_id][0])
        if not plan.appended:
            return BatchOutcome(plan.results, tuple(seqs), 0, None)
        checkpoint = self._write(conn, state, [plan.appended], (plan.totals, plan.new_accounts))
        return BatchOutcome(plan.results, tuple(seqs), len(plan.appended), checkpoint)

    def _append_new_group(
        self,
        conn: Connection,
        chunks: Iterable[Sequence[Transfer]],
        whole: Callable[[], Sequence[Transfer]],
        meanwhile: Callable[[], None] | None = None,
    ) -> tuple[int, Checkpoint | None]:
        """The settlement's path for one linked group of new transfers, given in order a chunk at a time.

        `whole()` gives the same transfers as one list, for the careful path
        should an id be taken after all; `meanwhile` runs once the transfers
        are on their way to the database. The caller holds the writers' lock.
        """
        stream = iter(chunks)
        first = next(stream, None)
        if not first:
            if meanwhile is not None:
                meanwhile()
            return 0, None
        state = self._state_for(conn)
        # The ids of a settlement revision are new by construction; should one be taken after all,
        # undo to the savepoint and let the careful path look every id up. Any other failure undoes
        # the batch too, so that a caller's transaction never keeps part of one.
        savepoint = conn.begin_nested()
        try:
            checkpoint = self._write(conn, state, itertools.chain([first], stream), None, meanwhile)
        except self._integrity_errors:
            savepoint.rollback()
            self._state = None
            outcome = self._append(conn, whole(), checked=True)
            if outcome.rejected:
                raise SettlementError(outcome.rejected[0].reason) from None
            if meanwhile is not None:
                meanwhile()
            return outcome.appended, outcome.checkpoint
        except TransferError as e:
            savepoint.rollback()
            self._state = None
            raise SettlementError(str(e)) from e
        except BaseException:
            if savepoint.is_active:
                savepoint.rollback()
            self._state = None
            raise
        savepoint.commit()
        return checkpoint.tree_size - state.seq, checkpoint

    def _write(
        self,
        conn: Connection,
        state: _State,
        chunks: Iterable[Sequence[Transfer]],
        planned: tuple[Mapping[str, AccountTotals], Sequence[str]] | None,
        meanwhile: Callable[[], None] | None = None,
    ) -> Checkpoint:
        """Append transfers after `state`: rows, totals and balance check, chain, nodes, checkpoint.

        The Python work of the batch (rows, the new totals unless `planned`
        gives them (with the new accounts), `meanwhile`, hashes, Merkle nodes,
        then the signature) is a generator of rows to insert,
        `_batch_items`, run ahead in a helper thread; the backend inserts each
        item as it comes, so the database stores one chunk while the next is
        made or hashed: PostgreSQL in its own process, SQLite in this thread,
        which does not hold the GIL while SQLite works.
        """
        if self.signing_key is None:
            raise LedgerError("this store has no signing key: it can read and verify, not write")
        backend = self._backend
        cursor = _raw_cursor(conn)
        written = backend.write(cursor, _run_ahead(self._batch_items(state, chunks, planned, meanwhile)))
        checkpoint = written.checkpoint
        backend.insert_checkpoint(
            cursor,
            (
                checkpoint.tree_size,
                checkpoint.origin,
                checkpoint.root_hash,
                checkpoint.chain_head,
                checkpoint.time_ms,
                checkpoint.previous_hash,
                checkpoint.public_key,
                checkpoint.signature,
                written.frontier.to_bytes(),
            ),
            written.completed,
        )
        totals = dict(state.totals)
        totals.update(written.totals)
        self._state = _State(
            seq=written.seq,
            head=written.head,
            frontier=written.frontier,
            totals=totals,
            checkpoint=checkpoint,
        )
        return checkpoint

    def _batch_items(
        self,
        state: _State,
        chunks: Iterable[Sequence[Transfer]],
        planned: tuple[Mapping[str, AccountTotals], Sequence[str]] | None,
        meanwhile: Callable[[], None] | None,
    ) -> Iterator[BatchItem]:
        """The rows of a batch in the order the database takes them (see BatchItem), then its outcome.

        First the transfers, chunk by chunk as they are made; then the new
        account totals, which need every transfer but no hash; then the chain
        rows, all in one item. So the database inserts the transfers while the
        next ones are made, and the totals while the chain is hashed.
        """
        backend = self._backend
        sums = GroupTotals() if planned is None else None
        made: list[Sequence[Transfer]] = []
        seq = state.seq
        size = CHUNK_TRANSFERS
        for given in chunks:
            # Chunks from the settlement are already about `size` long; a long list is cut up.
            pieces = (
                [given]
                if len(given) < 2 * size
                else [given[i : i + size] for i in range(0, len(given), size)]
            )
            for chunk in pieces:
                yield "transfers", backend.transfer_rows(seq + 1, chunk)
                if sums is not None:
                    sums.add(chunk)
                made.append(chunk)
                seq += len(chunk)
        totals, new_accounts = sums.new_totals(state.totals) if sums is not None else planned or ({}, ())
        yield "accounts", (_account_rows(totals), new_accounts, seq)
        if meanwhile is not None:
            meanwhile()
        # Every chain row at once: hashing is cheap next to a statement per chunk.
        frontier = state.frontier.copy()
        completed: list[tuple[int, int, bytes]] = []
        leaves, heads = leaves_and_heads(
            made[0] if len(made) == 1 else list(itertools.chain(*made)), state.head
        )
        head = heads[-HASH_SIZE:] if heads else state.head
        frontier.extend_joined(leaves, NODE_MIN_LEVEL, completed)
        if leaves:
            yield "chain", backend.chain_rows(state.seq + 1, leaves, heads)
        checkpoint = self._sign(state.checkpoint, frontier, head)
        yield "done", _Written(seq, head, frontier, completed, totals, checkpoint)

    def _sign(self, previous: Checkpoint | None, frontier: MerkleFrontier, chain_head: bytes) -> Checkpoint:
        if self.signing_key is None:
            raise LedgerError("this store has no signing key: it can read and verify, not write")
        time_ms = int(self.clock.now_s() * 1000)
        if previous is not None:
            time_ms = max(time_ms, previous.time_ms)
        return sign_checkpoint(
            self.signing_key,
            origin=self.origin,
            tree_size=frontier.size,
            root_hash=frontier.root(),
            chain_head=chain_head,
            time_ms=time_ms,
            previous_hash=previous.checkpoint_hash() if previous else NO_PREVIOUS,
        )

    def settle_interval(
        self, inputs: SettlementInputs, rules: SettlementRules, *, connection: Connection | None = None
    ) -> SettlementOutcome:
        """Settle one interval exactly once; later, better meter data books correcting transfers.

        Raises SettlementInputError for bad input, SettlementNotDueError before
        the metering deadline, SettlementConflictError for a clearing result
        (or measured data) that contradicts what was settled.
        """
        validate_interval(inputs.clearing)
        clearing = inputs.clearing
        due_s = settlement_due_s(clearing.interval_start_s, clearing.interval_s, rules)
        now_s = self.clock.now_s()
        if now_s < due_s:
            validate_rows(inputs)  # bad input is reported first, as for a due interval
            raise SettlementNotDueError(
                f"interval {clearing.interval_start_s} of market {clearing.market_id!r} is due for settlement "
                f"at {due_s}, it is {now_s:.0f}"
            )
        with self._writing(connection) as conn:
            return self._settle(conn, inputs, rules)

    def _settle(
        self,
        conn: Connection,
        inputs: SettlementInputs,
        rules: SettlementRules,
        *,
        restaged: bool = False,
    ) -> SettlementOutcome:
        """Settle `inputs`; with `restaged`, they hold all meter data held for the interval (see
        `plan_restaged_settlement`), else only what was delivered now (merged into the settled data).

        The clearing result's interval must have passed `validate_interval`; its
        rows are validated here. For a first settlement that happens once the
        first chunk of transfers is on its way to the database (rules that fail
        on bad rows leave the validation to name the problem), and before the
        checkpoint is signed; nothing made from bad rows is kept."""
        clearing = inputs.clearing
        self._backend.lock(conn)
        # The statements of every settlement go to the driver's cursor directly: SQLAlchemy's
        # building and row handling cost more here than the statements.
        cursor = _raw_cursor(conn)
        ph = self._backend.placeholder
        cursor.execute(
            "SELECT revision, clearing_digest, rules_json, meter_json, tree_size FROM settled_intervals "
            f"WHERE market_id = {ph} AND interval_start_s = {ph} ORDER BY revision DESC LIMIT 1",
            (clearing.market_id, clearing.interval_start_s),
        )
        found = cursor.fetchone()
        latest = _LatestRevision(*found) if found is not None else None
        rules_json = self._rules_json(rules)
        digests: list[str] = []
        meter_jsons: list[str] = []
        chunks: Iterable[Sequence[Transfer]]
        whole: Callable[[], Sequence[Transfer]]
        meanwhile: Callable[[], None] | None = None
        if latest is None:
            revision = 0
            try:
                meter_state = initial_meter_state(clearing, inputs.meter_energy, rules)
                estimated = estimated_participants(meter_state)
            except Exception:
                validate_rows(inputs)
                raise
            chunks = _validated_after_first(first_settlement_chunks(clearing, meter_state, rules), inputs)

            def whole() -> list[Transfer]:
                validate_rows(inputs)
                return first_settlement_transfers(clearing, meter_state, rules)

            def meanwhile() -> None:
                # Only stored with the revision: computed while the transfers are inserted.
                digests.append(clearing.digest())
                meter_jsons.append(meter_state_to_json(meter_state))

        else:
            validate_rows(inputs)
            digest = clearing.digest()
            digests.append(digest)
            if latest.clearing_digest != digest:
                raise SettlementConflictError(
                    f"interval {clearing.interval_start_s} of market {clearing.market_id!r} was settled from "
                    f"another clearing result (digest {latest.clearing_digest}, now {digest})"
                )
            # An interval is always settled under the rules it was first settled with.
            rules_json = latest.rules_json
            replan = plan_restaged_settlement if restaged else plan_resettlement
            plan = replan(
                inputs,
                SettlementRules.from_mapping(json.loads(latest.rules_json)),
                meter_state_from_json(latest.meter_json),
                int(latest.revision),
            )
            if plan is None:
                return SettlementOutcome(
                    market_id=clearing.market_id,
                    interval_start_s=clearing.interval_start_s,
                    revision=int(latest.revision),
                    status=SettlementStatus.UNCHANGED,
                    transfer_count=0,
                    first_seq=0,
                    tree_size=int(latest.tree_size),
                    estimated_participants=tuple(
                        sorted(
                            p
                            for p, v in meter_state_from_json(latest.meter_json).items()
                            if v[2] is not MeterQuality.MEASURED
                        )
                    ),
                    checkpoint=None,
                    interval_s=clearing.interval_s,
                )
            revision = plan.revision
            meter_state = plan.meter_state
            estimated = plan.estimated_participants
            chunks = [plan.transfers]
            whole = functools.partial(list, plan.transfers)
        try:
            appended, checkpoint = self._append_new_group(conn, chunks, whole, meanwhile)
        except SettlementInputError:
            raise
        except Exception:
            if revision == 0:
                validate_rows(inputs)  # bad rows are what to report, whatever they broke
            raise
        digest = digests[0] if digests else clearing.digest()
        state = self._state_for(conn) if appended == 0 else self._state
        assert state is not None
        first_seq = state.seq - appended + 1 if appended else 0
        now_ms = int(self.clock.now_s() * 1000)
        cursor.execute(
            f"INSERT INTO settled_intervals ({','.join(_SETTLED_COLUMNS)}) "
            f"VALUES ({','.join([ph] * len(_SETTLED_COLUMNS))})",
            (
                clearing.market_id,
                clearing.interval_start_s,
                revision,
                clearing.interval_s,
                digest,
                rules_json,
                meter_jsons[0] if meter_jsons else meter_state_to_json(meter_state),
                len(estimated),
                first_seq,
                appended,
                state.seq,
                now_ms,
            ),
        )
        return SettlementOutcome(
            market_id=clearing.market_id,
            interval_start_s=clearing.interval_start_s,
            revision=revision,
            status=SettlementStatus.SETTLED if revision == 0 else SettlementStatus.CORRECTED,
            transfer_count=appended,
            first_seq=first_seq,
            tree_size=state.seq,
            estimated_participants=estimated,
            checkpoint=checkpoint,
            interval_s=clearing.interval_s,
        )

    # ----------------------------------------------------------------- staging

    def stage_clearing(self, clearing: ClearingResult, *, connection: Connection | None = None) -> bool:
        """Hold a clearing result until its interval is due; True if it was new, False for a repeat.

        Call it in the consumer's transaction, with its inbox row. A different
        clearing result for the same interval raises SettlementConflictError.
        """
        validate_inputs(SettlementInputs(clearing, ()))
        digest = clearing.digest()
        c = staged_clearings_table.c
        with self._writing(connection) as conn:
            row = conn.execute(
                select(c.clearing_digest).where(
                    c.market_id == clearing.market_id, c.interval_start_s == clearing.interval_start_s
                )
            ).first()
            if row is not None:
                if row[0] != digest:
                    raise SettlementConflictError(
                        f"interval {clearing.interval_start_s} of market {clearing.market_id!r} already has "
                        f"another clearing result (digest {row[0]}, now {digest})"
                    )
                return False
            conn.execute(
                staged_clearings_table.insert().values(
                    market_id=clearing.market_id,
                    interval_start_s=clearing.interval_start_s,
                    interval_s=clearing.interval_s,
                    clearing_digest=digest,
                    clearing_json=json.dumps(clearing_to_json(clearing), separators=(",", ":")),
                    received_at_ms=int(self.clock.now_s() * 1000),
                )
            )
            self._mark_pending(conn, clearing.market_id, clearing.interval_start_s)
            return True

    def stage_meter_energy(
        self,
        market_id: str,
        interval_start_s: int,
        readings: Sequence[MeterEnergy],
        *,
        connection: Connection | None = None,
    ) -> int:
        """Hold meter energy of an interval; returns how many readings improved what was held.

        A reading replaces a held one only if its quality is better (estimated
        < measured), so redeliveries in any order are harmless; a measurement
        that contradicts a held measurement raises SettlementConflictError.
        """
        validate_meter_energy(readings)
        now_ms = int(self.clock.now_s() * 1000)
        with self._writing(connection) as conn:
            held = _held_energy(
                conn, staged_meter_energy_table, "participant_id", market_id, interval_start_s,
                [r.participant_id for r in readings],
            )  # fmt: skip
            better = [
                r
                for r in readings
                if _improves(
                    r, held.get(r.participant_id), f"participant {r.participant_id!r}", interval_start_s
                )
            ]
            if better:
                rows = [
                    {
                        "participant_id": r.participant_id,
                        **_energy_row(r, market_id, interval_start_s, now_ms),
                    }
                    for r in better
                ]
                _upsert_energy(conn, staged_meter_energy_table, "participant_id", rows)
                self._mark_pending(conn, market_id, interval_start_s)
            return len(better)

    def stage_meter_readings(
        self,
        market_id: str,
        interval_start_s: int,
        readings: Sequence[MeterReading],
        *,
        connection: Connection | None = None,
    ) -> int:
        """Hold meter energy of an interval meter by meter; returns how many readings improved what was held.

        For metering that reports an interval in several batches: a
        participant's energy is the sum of its meters held when the interval is
        settled (or settled again). As with `stage_meter_energy`, a reading
        replaces a held one only if its quality is better, so redeliveries in
        any order are harmless; a measurement that contradicts a held one, or a
        meter that changes participant within an interval, raises
        SettlementConflictError and changes nothing.
        """
        validate_meter_readings(readings)
        now_ms = int(self.clock.now_s() * 1000)
        with self._writing(connection) as conn:
            held = _held_energy(
                conn, staged_meter_readings_table, "meter_id", market_id, interval_start_s,
                [r.meter_id for r in readings],
            )  # fmt: skip
            better = []
            for r in readings:
                before = held.get(r.meter_id)
                if before is not None and before["participant_id"] != r.participant_id:
                    raise SettlementConflictError(
                        f"meter {r.meter_id!r} in interval {interval_start_s} is held for participant "
                        f"{before['participant_id']!r}, now reported for {r.participant_id!r}"
                    )
                if _improves(r, before, f"meter {r.meter_id!r}", interval_start_s):
                    better.append(r)
            if better:
                rows = [
                    {
                        "meter_id": r.meter_id,
                        "participant_id": r.participant_id,
                        **_energy_row(r, market_id, interval_start_s, now_ms),
                    }
                    for r in better
                ]
                _upsert_energy(conn, staged_meter_readings_table, "meter_id", rows)
                self._mark_pending(conn, market_id, interval_start_s)
            return len(better)

    def _mark_pending(self, conn: Connection, market_id: str, interval_start_s: int) -> None:
        table = _insert_for(conn, pending_intervals_table)
        conn.execute(
            table.values(
                market_id=market_id, interval_start_s=interval_start_s, version=1
            ).on_conflict_do_update(
                index_elements=["market_id", "interval_start_s"],
                set_={"version": pending_intervals_table.c.version + 1},
            )
        )

    def settle_due(
        self,
        rules_for: Callable[[str], SettlementRules],
        *,
        limit: int = 100,
        on_settled: Callable[[Connection, SettlementOutcome], None] | None = None,
        on_error: Callable[[str, int, Exception], None] | None = None,
    ) -> list[SettlementOutcome]:
        """Settle, each in its own transaction, the held intervals whose clearing result is in and whose
        metering deadline has passed, oldest first; `rules_for(market_id)` gives a market's rules.

        An interval with new meter data since its settlement is settled again
        (correcting transfers) from all the data held for it; one with nothing
        new is left as it is.

        `on_settled(conn, outcome)` runs in the settlement's transaction, e.g. to
        add events to an outbox that exist if and only if the settlement
        committed. With `on_error`, an interval whose settlement is refused
        (SettlementInputError, SettlementConflictError, SettlementError) is
        rolled back, reported as `on_error(market_id, interval_start_s, error)`
        and stays pending, and the later intervals still settle; without it the
        error is raised. BalanceInvariantError and LedgerCorruptError are always raised.
        """
        p = pending_intervals_table.c
        c = staged_clearings_table.c
        now_s = self.clock.now_s()
        with self.engine.connect() as conn:
            candidates = conn.execute(
                select(p.market_id, p.interval_start_s, c.interval_s)
                .join(
                    staged_clearings_table,
                    (c.market_id == p.market_id) & (c.interval_start_s == p.interval_start_s),
                )
                .order_by(p.interval_start_s, p.market_id)
            ).all()
        outcomes = []
        for market_id, interval_start_s, interval_s in candidates:
            rules = rules_for(str(market_id))
            if now_s < settlement_due_s(int(interval_start_s), int(interval_s), rules):
                continue
            try:
                with self._writing(None) as conn:
                    version = conn.execute(
                        select(p.version).where(
                            p.market_id == market_id, p.interval_start_s == interval_start_s
                        )
                    ).scalar()
                    if version is None:
                        continue  # settled meanwhile by another caller
                    inputs = self._staged_inputs(conn, market_id, interval_start_s)
                    validate_interval(inputs.clearing)
                    outcome = self._settle(conn, inputs, rules, restaged=True)
                    # Data that arrived meanwhile bumped the version and keeps the interval pending.
                    conn.execute(
                        pending_intervals_table.delete().where(
                            p.market_id == market_id,
                            p.interval_start_s == interval_start_s,
                            p.version == version,
                        )
                    )
                    if on_settled is not None and outcome.status is not SettlementStatus.UNCHANGED:
                        on_settled(conn, outcome)
            except (SettlementInputError, SettlementConflictError, SettlementError) as error:
                if on_error is None:
                    raise
                on_error(str(market_id), int(interval_start_s), error)
                continue
            outcomes.append(outcome)
            if len(outcomes) >= limit:
                break
        return outcomes

    def _staged_inputs(self, conn: Connection, market_id: str, interval_start_s: int) -> SettlementInputs:
        c = staged_clearings_table.c
        m = staged_meter_energy_table.c
        clearing_json = conn.execute(
            select(c.clearing_json).where(c.market_id == market_id, c.interval_start_s == interval_start_s)
        ).scalar_one()
        # Energy held per participant counts as one more meter of that participant.
        held = [
            MeterReading("", str(r[0]), int(r[1]), int(r[2]), MeterQuality(int(r[3])))
            for r in conn.execute(
                select(m.participant_id, m.import_wh, m.export_wh, m.quality).where(
                    m.market_id == market_id, m.interval_start_s == interval_start_s
                )
            )
        ]
        r_ = staged_meter_readings_table.c
        held.extend(
            MeterReading(str(r[0]), str(r[1]), int(r[2]), int(r[3]), MeterQuality(int(r[4])))
            for r in conn.execute(
                select(r_.meter_id, r_.participant_id, r_.import_wh, r_.export_wh, r_.quality).where(
                    r_.market_id == market_id, r_.interval_start_s == interval_start_s
                )
            )
        )
        return SettlementInputs(clearing_from_json(json.loads(clearing_json)), participant_energy(held))

    def pending_intervals(self) -> list[tuple[str, int]]:
        """Intervals holding data that is not settled yet (waiting for their clearing result or deadline)."""
        p = pending_intervals_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(p.market_id, p.interval_start_s).order_by(p.interval_start_s)).all()
        return [(str(r[0]), int(r[1])) for r in rows]

    # ----------------------------------------------------------------- reads

    def balance(self, account_id: str) -> AccountBalance:
        a = accounts_table.c
        with self.engine.connect() as conn:
            row = conn.execute(
                select(a.debits_nano, a.credits_nano).where(a.account_id == account_id)
            ).first()
        if row is None:
            raise AccountNotFoundError(f"no account {account_id!r}")
        return AccountBalance(account_id, int(row[0]), int(row[1]))

    def balances(self) -> dict[str, AccountBalance]:
        a = accounts_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(select(a.account_id, a.debits_nano, a.credits_nano)).all()
        return {str(r[0]): AccountBalance(str(r[0]), int(r[1]), int(r[2])) for r in rows}

    def statement(
        self,
        account_id: str,
        *,
        from_interval_start_s: int,
        to_interval_start_s: int,
        after_seq: int = 0,
        limit: int = 1000,
    ) -> list[StatementLine]:
        """The account's transfers of intervals in [from, to), in ledger order, after `after_seq` (paging)."""
        if to_interval_start_s < from_interval_start_s:
            raise ValueError("to_interval_start_s must not be before from_interval_start_s")
        if not 1 <= limit <= 100_000:
            raise ValueError("limit must be from 1 to 100000")
        t = transfers_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(transfers_table)
                .where(
                    t.interval_start_s >= from_interval_start_s,
                    t.interval_start_s < to_interval_start_s,
                    (t.debit_account == account_id) | (t.credit_account == account_id),
                    t.seq > after_seq,
                )
                .order_by(t.seq)
                .limit(limit)
            ).all()
        lines = []
        for r in rows:
            transfer = _transfer_from_row(r)
            signed = transfer.amount_nano if transfer.credit_account == account_id else -transfer.amount_nano
            lines.append(StatementLine(int(r.seq), transfer, signed))
        return lines

    def transfer(self, transfer_id: str) -> StoredTransfer:
        with self.engine.connect() as conn:
            row = conn.execute(
                select(transfers_table).where(transfers_table.c.transfer_id == transfer_id)
            ).first()
        if row is None:
            raise TransferNotFoundError(f"no transfer {transfer_id!r}")
        return StoredTransfer(int(row.seq), _transfer_from_row(row))

    def transfers_in_range(
        self, first_seq: int, last_seq: int, *, connection: Connection | None = None
    ) -> list[StoredTransfer]:
        """The transfers with `first_seq` <= seq <= `last_seq`, in ledger order (also inside a caller's transaction)."""
        t = transfers_table.c
        query = select(transfers_table).where(t.seq >= first_seq, t.seq <= last_seq).order_by(t.seq)
        if connection is not None:
            rows = connection.execute(query).all()
        else:
            with self.engine.connect() as conn:
                rows = conn.execute(query).all()
        return [StoredTransfer(int(r.seq), _transfer_from_row(r)) for r in rows]

    def transfers_of_interval(self, interval_start_s: int) -> list[StoredTransfer]:
        t = transfers_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(transfers_table).where(t.interval_start_s == interval_start_s).order_by(t.seq)
            ).all()
        return [StoredTransfer(int(r.seq), _transfer_from_row(r)) for r in rows]

    def settled_revisions(self, market_id: str, interval_start_s: int) -> list[SettledRevision]:
        s = settled_intervals_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(settled_intervals_table)
                .where(s.market_id == market_id, s.interval_start_s == interval_start_s)
                .order_by(s.revision)
            ).all()
        return [
            SettledRevision(
                market_id=r.market_id,
                interval_start_s=int(r.interval_start_s),
                revision=int(r.revision),
                first_seq=int(r.first_seq),
                transfer_count=int(r.transfer_count),
                tree_size=int(r.tree_size),
                estimated_count=int(r.estimated_count),
                settled_at_ms=int(r.settled_at_ms),
            )
            for r in rows
        ]

    def checkpoints(self, *, after_size: int = 0, limit: int = 1000) -> list[Checkpoint]:
        c = checkpoints_table.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(checkpoints_table).where(c.tree_size > after_size).order_by(c.tree_size).limit(limit)
            ).all()
        return [_checkpoint_from_row(r) for r in rows]

    def latest_checkpoint(self) -> Checkpoint | None:
        with self.engine.connect() as conn:
            return self._last_checkpoint(conn)[0]

    def _perfect(self, conn: Connection) -> Callable[[int, int], bytes]:
        """Perfect-subtree hashes from the stored nodes (level ≥ NODE_MIN_LEVEL) or the chain's leaf hashes."""
        memo: dict[tuple[int, int], bytes] = {}
        n = merkle_nodes_table.c
        c = chain_table.c

        def perfect(level: int, index: int) -> bytes:
            found = memo.get((level, index))
            if found is not None:
                return found
            if level >= NODE_MIN_LEVEL:
                row = conn.execute(select(n.hash).where(n.level == level, n.node_index == index)).first()
                if row is None:
                    raise LedgerCorruptError(f"merkle node (level {level}, index {index}) is missing")
                found = bytes(row[0])
            else:
                first = index << level
                rows = conn.execute(
                    select(c.entry_hash).where(c.seq > first, c.seq <= first + (1 << level)).order_by(c.seq)
                ).all()
                if len(rows) != 1 << level:
                    raise ProofError(f"leaves {first}..{first + (1 << level)} are not all stored")
                found = root_of([bytes(r[0]) for r in rows])
            memo[(level, index)] = found
            return found

        return perfect

    def receipt(self, transfer_id: str, *, tree_size: int | None = None) -> Receipt:
        """The transfer, its inclusion proof and the checkpoint (latest, or of `tree_size`) that covers it."""
        stored = self.transfer(transfer_id)
        with self.engine.connect() as conn:
            if tree_size is None:
                checkpoint = self._last_checkpoint(conn)[0]
            else:
                row = conn.execute(
                    select(checkpoints_table).where(checkpoints_table.c.tree_size == tree_size)
                ).first()
                checkpoint = _checkpoint_from_row(row) if row is not None else None
            if checkpoint is None or checkpoint.tree_size < stored.seq:
                raise LookupError(
                    f"transfer {transfer_id!r} (seq {stored.seq}) is not covered by that checkpoint"
                )
            proof = inclusion_proof(stored.seq - 1, checkpoint.tree_size, self._perfect(conn))
        return Receipt(
            seq=stored.seq, transfer=stored.transfer, inclusion_proof=tuple(proof), checkpoint=checkpoint
        )

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """RFC 9162 proof that the tree of `old_size` is a prefix of the tree of `new_size`."""
        with self.engine.connect() as conn:
            chain_size = self._read_head(conn)[0]
            if new_size > chain_size:
                raise ProofError(f"size {new_size} is beyond the ledger's {chain_size} transfers")
            return consistency_proof(old_size, new_size, self._perfect(conn))

    # ----------------------------------------------------------------- verification

    def verify(
        self,
        *,
        trusted_public_key: bytes | None = None,
        progress: Callable[[int, int], None] | None = None,
        connection: Connection | None = None,
        workers: int = 1,
        chunk: int = 20_000,
        min_range: int = 25_000,
    ) -> AuditReport:
        """Re-derive the whole ledger from its rows; raises VerificationError naming the first failure.

        Without `connection` it reads one consistent snapshot without blocking
        writers, and with `workers` > 1 it hashes ranges of the chain in that
        many forked processes (for the command line; a threaded server keeps
        the default of 1). With a connection, it reads what that connection
        sees, uncommitted changes included, in this process.
        """
        with _gc_paused():
            return self._verify(trusted_public_key, progress, connection, workers, chunk, min_range)

    def _verify(
        self,
        trusted_public_key: bytes | None,
        progress: Callable[[int, int], None] | None,
        connection: Connection | None,
        workers: int,
        chunk: int,
        min_range: int,
    ) -> AuditReport:
        if connection is not None:
            return _audit(
                _raw_cursor(connection), self._backend.placeholder, trusted_public_key, progress, chunk
            )
        if self.engine.dialect.name == "postgresql":
            with (
                self.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn,
                conn.begin(),
            ):
                return _audit(
                    _walking_cursor(conn.connection.dbapi_connection),
                    "%s",
                    trusted_public_key,
                    progress,
                    chunk,
                    engine=self.engine,
                    workers=workers,
                    min_range=min_range,
                )
        with self.engine.connect() as conn:
            dbapi = conn.connection.dbapi_connection
            assert dbapi is not None
            # A deferred (read) transaction gives a snapshot in WAL mode without taking the write lock.
            dbapi.execute("BEGIN")
            try:
                return _audit(
                    dbapi.cursor(),
                    "?",
                    trusted_public_key,
                    progress,
                    chunk,
                    engine=self.engine,
                    workers=workers,
                )
            finally:
                dbapi.execute("ROLLBACK")


def _walking_cursor(dbapi: Any) -> Any:
    """A PostgreSQL cursor for walking the ledger along its primary keys, in the current transaction.

    Right after a bulk load the planner's statistics can be stale, and it then
    picks a bitmap scan and an external sort for what is a plain walk along the
    primary key; these settings last until the transaction ends. Binary
    results spare decoding hex for the hashes.
    """
    cursor = dbapi.cursor(binary=True)
    cursor.execute("SET LOCAL enable_bitmapscan = off")
    cursor.execute("SET LOCAL enable_sort = off")
    return cursor


def _range_sql(table: str, columns: Sequence[str], ph: str) -> str:
    return (
        f"SELECT {', '.join(columns)} FROM {table} WHERE seq > {ph} AND seq <= {ph} ORDER BY seq LIMIT {ph}"
    )


def _audit_range(
    cursor: Any,
    ph: str,
    auditor: LedgerAuditor,
    begin: int,
    end: int,
    chunk: int,
    on_progress: Callable[[int], None],
) -> RangeResult:
    start_head = None
    if begin:
        cursor.execute(f"SELECT chained_hash FROM chain WHERE seq = {ph}", (begin,))
        row = cursor.fetchone()
        start_head = bytes(row[0]) if row is not None and row[0] is not None else None
    ranged = auditor.range_auditor(begin, end, start_head)
    # Two walks along the primary keys, one per table, zipped by seq: cheaper for the server than a join.
    transfers_sql = _range_sql("transfers", TRANSFER_COLUMNS, ph)
    chain_sql = _range_sql("chain", CHAIN_COLUMNS, ph)
    last = begin
    while not ranged.failed and last < end:
        cursor.execute(transfers_sql, (last, end, chunk))
        transfer_rows = cursor.fetchall()
        cursor.execute(chain_sql, (last, end, chunk))
        chain_rows = cursor.fetchall()
        if not transfer_rows and not chain_rows:
            break
        ranged.feed(transfer_rows, chain_rows)
        last = ranged.verified
        on_progress(last - begin)
    return ranged.result()


# Set in the parent just before forking the verification workers, which inherit it.
_FORKED: dict[str, Any] = {}


def _audit_range_in_child(index: int) -> RangeResult:
    engine: Engine = _FORKED["engine"]
    engine.dispose(close=False)  # never touch the parent's connections from the child
    begin, end = _FORKED["ranges"][index]
    counters = _FORKED["counters"]

    def on_progress(done: int) -> None:
        counters[index] = done

    with engine.connect() as conn:
        dbapi = conn.connection.dbapi_connection
        assert dbapi is not None
        cursor = _walking_cursor(dbapi) if engine.dialect.name == "postgresql" else dbapi.cursor()
        return _audit_range(
            cursor, _FORKED["ph"], _FORKED["auditor"], begin, end, _FORKED["chunk"], on_progress
        )


def _audit(
    cursor: Any,
    ph: str,
    trusted_public_key: bytes | None,
    progress: Callable[[int, int], None] | None,
    chunk: int,
    *,
    engine: Engine | None = None,
    workers: int = 1,
    min_range: int = 25_000,
) -> AuditReport:
    """Read what is fixed at the start (checkpoints, nodes, accounts, records) from `cursor`'s snapshot,
    then verify the transfers, which never change, in ranges."""
    try:
        cursor.execute(f"SELECT {', '.join(_CHECKPOINT_COLUMNS)} FROM checkpoints ORDER BY tree_size")
        checkpoints = [(_checkpoint_from_tuple(r), bytes(r[8])) for r in cursor.fetchall()]
        cursor.execute("SELECT level, node_index, hash FROM merkle_nodes")
        nodes = {(int(r[0]), int(r[1])): bytes(r[2]) for r in cursor.fetchall()}
    except (TypeError, ValueError) as e:
        raise VerificationError(f"checkpoints or merkle_nodes hold a malformed value: {e}") from e
    cursor.execute("SELECT COUNT(*) FROM chain")
    chain_rows = int(cursor.fetchone()[0])
    cursor.execute("SELECT COALESCE(MAX(seq), 0) FROM transfers")
    total = int(cursor.fetchone()[0])
    cursor.execute("SELECT account_id, kind, debits_nano, credits_nano FROM accounts")
    accounts = cursor.fetchall()
    cursor.execute(
        "SELECT market_id, interval_start_s, revision, first_seq, transfer_count, tree_size FROM settled_intervals"
    )
    settled = cursor.fetchall()
    auditor = LedgerAuditor(checkpoints, nodes, NODE_MIN_LEVEL, trusted_public_key)
    ranges = auditor.plan(total, workers if engine is not None else 1, min_range)

    def report(done: int) -> None:
        if progress is not None:
            progress(done, total)

    if len(ranges) == 1:
        results = [_audit_range(cursor, ph, auditor, 0, total, chunk, report)]
    else:
        assert engine is not None
        context = multiprocessing.get_context("fork")
        counters = context.Array("q", len(ranges), lock=False)
        _FORKED.update(engine=engine, ranges=ranges, counters=counters, ph=ph, auditor=auditor, chunk=chunk)
        try:
            with context.Pool(len(ranges)) as pool:
                pending = pool.map_async(_audit_range_in_child, range(len(ranges)))
                while not pending.ready():
                    pending.wait(0.5)
                    report(sum(counters))
                results = pending.get()
        finally:
            _FORKED.clear()
    return auditor.finish(results, chain_rows, accounts, settled)


def _transfer_from_row(r: Any) -> Transfer:
    return Transfer(
        str(r.transfer_id),
        str(r.debit_account),
        str(r.credit_account),
        int(r.amount_nano),
        str(r.code),
        int(r.interval_start_s),
        str(r.linked_group),
        int(r.flags),
    )


def _checkpoint_from_tuple(r: Sequence[Any]) -> Checkpoint:
    return Checkpoint(
        origin=str(r[1]),
        tree_size=int(r[0]),
        root_hash=bytes(r[2]),
        chain_head=bytes(r[3]),
        time_ms=int(r[4]),
        previous_hash=bytes(r[5]),
        public_key=bytes(r[6]),
        signature=bytes(r[7]),
    )


def _checkpoint_from_row(r: Any) -> Checkpoint:
    return Checkpoint(
        origin=str(r.origin),
        tree_size=int(r.tree_size),
        root_hash=bytes(r.root_hash),
        chain_head=bytes(r.chain_head),
        time_ms=int(r.time_ms),
        previous_hash=bytes(r.previous_hash),
        public_key=bytes(r.public_key),
        signature=bytes(r.signature),
    )


# Staged meter energy, per participant or per meter: one rule for both tables.
_ENERGY_COLUMNS = ("import_wh", "export_wh", "quality", "received_at_ms")


def _held_energy(
    conn: Connection, table: Table, key: str, market_id: str, interval_start_s: int, keys: Sequence[str]
) -> dict[str, Mapping[str, Any]]:
    """The rows held for `keys` (values of column `key`) in one interval, read 500 keys at a time."""
    c = table.c
    held: dict[str, Mapping[str, Any]] = {}
    for i in range(0, len(keys), 500):
        for row in conn.execute(
            select(table).where(
                c.market_id == market_id,
                c.interval_start_s == interval_start_s,
                c[key].in_(keys[i : i + 500]),
            )
        ):
            held[str(row._mapping[key])] = dict(row._mapping)
    return held


def _improves(
    reading: MeterEnergy | MeterReading, held: Mapping[str, Any] | None, what: str, interval_start_s: int
) -> bool:
    """True if `reading` is better than what is held (none, or lower quality); a contradicting measurement raises."""
    if held is None or reading.quality > int(held["quality"]):
        return True
    if (
        reading.quality is MeterQuality.MEASURED
        and int(held["quality"]) == MeterQuality.MEASURED
        and (reading.import_wh, reading.export_wh) != (int(held["import_wh"]), int(held["export_wh"]))
    ):
        raise SettlementConflictError(
            f"{what} in interval {interval_start_s}: measured {reading.import_wh}/{reading.export_wh} Wh "
            f"contradicts the measured {held['import_wh']}/{held['export_wh']} Wh held"
        )
    return False


def _energy_row(
    reading: MeterEnergy | MeterReading, market_id: str, interval_start_s: int, received_at_ms: int
) -> dict[str, Any]:
    return {
        "market_id": market_id,
        "interval_start_s": interval_start_s,
        "import_wh": reading.import_wh,
        "export_wh": reading.export_wh,
        "quality": int(reading.quality),
        "received_at_ms": received_at_ms,
    }


def _upsert_energy(conn: Connection, table: Table, key: str, rows: list[dict[str, Any]]) -> None:
    """Insert the rows, or replace the energy and quality of the ones held under the same key."""
    insert = _insert_for(conn, table)
    statement = insert.on_conflict_do_update(
        index_elements=["market_id", "interval_start_s", key],
        set_={column: insert.excluded[column] for column in _ENERGY_COLUMNS},
    )
    conn.execute(statement, rows)
