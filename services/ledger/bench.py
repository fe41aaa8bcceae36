"""`p2pgrid bench ledger`: settlement write speed against the driver's bulk insert of the same rows, and verify speed.

Per database one JSON line:

- `transfers_per_s`: transfers written by `settle_interval` over a synthetic
  day (validation, settlement rules, ids, hashing, Merkle nodes, account
  totals, balance check, signed checkpoint; one transaction per interval).
- `baseline_per_s`: the same transfers and chain rows, taken from that run,
  inserted into a fresh ledger schema (same tables, indexes and triggers) in
  the same per-interval transactions through the driver's own bulk path, with
  nothing else to do: sqlite3 `executemany`; on PostgreSQL psycopg `COPY`,
  whichever of its forms was fastest (text or binary rows through
  `write_row`, or text formatted by the caller in blocks of 256 rows, as the
  ledger writes its transfers). `ratio` = transfers_per_s / baseline_per_s.
- SQLite only, `multirow_per_s` / `multirow_ratio`: the same rows as multi-row
  `INSERT … VALUES` statements of 256 rows, the statement form the ledger
  uses for its transfers, which SQLite runs faster than `executemany`.
- `verify_s_per_million`: seconds `p2pgrid ledger verify` needs per million
  transfers (its verification, with its default number of worker processes),
  measured on the settled ledger.

Each measurement is the best of `--rounds` runs, settlement and baselines
alternating, so that a busy machine slows all of them alike.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from nacl.signing import SigningKey
from sqlalchemy import Engine

from services.domain.intervals import Clock, SimulatedClock
from services.ledger.adapters.sql import (
    CHAIN_COLUMNS,
    CHUNK_TRANSFERS,
    TRANSFER_COLUMNS,
    LedgerStore,
    chain_table,
    migrate_ledger,
    transfers_table,
)
from services.ledger.cli import default_verify_workers
from services.ledger.domain.settlement import SettlementInputs, SettlementRules
from services.ledger.synthetic import synthetic_day
from services.platform.db import drop_schema, make_engine, unique_schema_name

DEFAULT_BENCH_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"

Batch = tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]
Insert = Callable[[Any, Batch], None]
"""Inserts one interval's transfer and chain rows with a raw driver cursor, inside a transaction."""

_BINARY_TYPES = {
    "transfers": ["int8", "text", "text", "text", "int8", "text", "int8", "text", "int2"],
    "chain": ["int8", "text", "bytea", "bytea"],
}


@contextmanager
def _fresh_engine(database: str, postgres_url: str, workdir: Path, name: str) -> Iterator[Engine]:
    if database == "sqlite":
        path = workdir / f"{name}.db"
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        engine = make_engine(f"sqlite:///{path}")
        try:
            yield engine
        finally:
            engine.dispose()
        return
    schema = unique_schema_name("bench_ledger")
    engine = make_engine(postgres_url, schema=schema)
    try:
        yield engine
    finally:
        engine.dispose()
        drop_schema(postgres_url, schema)


def _settle_all(
    engine: Engine, inputs: Sequence[SettlementInputs], rules: SettlementRules, clock: Clock
) -> tuple[float, int, LedgerStore]:
    migrate_ledger(engine)
    store = LedgerStore(engine, SigningKey.generate(), clock=clock)
    start = time.perf_counter()
    written = 0
    for item in inputs:
        written += store.settle_interval(item, rules).transfer_count
    return time.perf_counter() - start, written, store


def _rows_by_interval(engine: Engine) -> list[Batch]:
    """The transfers and chain rows the settlement wrote, grouped as it committed them (one interval each)."""
    with engine.connect() as conn:
        transfers = [tuple(r) for r in conn.execute(transfers_table.select().order_by(transfers_table.c.seq))]
        chain = [tuple(r) for r in conn.execute(chain_table.select().order_by(chain_table.c.seq))]
    batches: list[Batch] = []
    start = 0
    for i in range(1, len(transfers) + 1):
        if i == len(transfers) or transfers[i][6] != transfers[start][6]:
            batches.append((transfers[start:i], chain[start:i]))
            start = i
    return batches


def _insert_sql(table: str, columns: Sequence[str], rows: int) -> str:
    one = "(" + ",".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({','.join(columns)}) VALUES " + ",".join([one] * rows)


def _tables(batch: Batch) -> tuple[tuple[str, Sequence[str], list[tuple[Any, ...]]], ...]:
    return (("transfers", TRANSFER_COLUMNS, batch[0]), ("chain", CHAIN_COLUMNS, batch[1]))


def _sqlite_executemany(cursor: Any, batch: Batch) -> None:
    cursor.executemany(_insert_sql("transfers", TRANSFER_COLUMNS, 1), batch[0])
    cursor.executemany(_insert_sql("chain", CHAIN_COLUMNS, 1), batch[1])


def _sqlite_multirow(cursor: Any, batch: Batch) -> None:
    flatten = itertools.chain.from_iterable
    for table, columns, rows in _tables(batch):
        for i in range(0, len(rows), CHUNK_TRANSFERS):
            chunk = rows[i : i + CHUNK_TRANSFERS]
            cursor.execute(_insert_sql(table, columns, len(chunk)), list(flatten(chunk)))


def _copy(binary: bool) -> Insert:
    def insert(cursor: Any, batch: Batch) -> None:
        for table, columns, rows in _tables(batch):
            options = " (FORMAT BINARY)" if binary else ""
            with cursor.copy(f"COPY {table} ({','.join(columns)}) FROM STDIN{options}") as copy:
                if binary:
                    copy.set_types(_BINARY_TYPES[table])
                write = copy.write_row
                for row in rows:
                    write(row)

    return insert


def _copy_text_blocks(cursor: Any, batch: Batch) -> None:
    """COPY in text format, the rows formatted by the caller 256 at a time, as the ledger does its transfers."""
    transfers, chain = batch
    with cursor.copy(f"COPY transfers ({','.join(TRANSFER_COLUMNS)}) FROM STDIN") as copy:
        for i in range(0, len(transfers), CHUNK_TRANSFERS):
            copy.write(
                "".join(["\t".join(map(str, row)) + "\n" for row in transfers[i : i + CHUNK_TRANSFERS]])
            )
    with cursor.copy(f"COPY chain ({','.join(CHAIN_COLUMNS)}) FROM STDIN") as copy:
        for i in range(0, len(chain), CHUNK_TRANSFERS):
            copy.write(
                "".join(
                    [
                        f"{seq}\t{tid}\t\\\\x{bytes(entry).hex()}\t\\\\x{bytes(chained).hex()}\n"
                        for seq, tid, entry, chained in chain[i : i + CHUNK_TRANSFERS]
                    ]
                )
            )


def _timed_baseline(
    database: str, postgres_url: str, workdir: Path, batches: Sequence[Batch], insert: Insert
) -> float:
    """Seconds to insert `batches` into a fresh ledger schema, one transaction per interval."""
    with _fresh_engine(database, postgres_url, workdir, "baseline") as engine:
        migrate_ledger(engine)
        start = time.perf_counter()
        for batch in batches:
            with engine.begin() as conn:
                insert(conn.connection.dbapi_connection.cursor(), batch)  # type: ignore[union-attr]
        return time.perf_counter() - start


def bench_database(
    database: str,
    *,
    participants: int,
    intervals: int,
    rounds: int,
    postgres_url: str,
    progress: Callable[[str], None],
) -> dict[str, Any]:
    day = synthetic_day(participants=participants, intervals=intervals)
    inputs = [SettlementInputs.from_json(r) for r in day.recorded]
    rules = SettlementRules.from_mapping(day.rules)
    clock = SimulatedClock(start_s=time.time())  # the synthetic day lies in the past
    baselines: dict[str, Insert] = (
        {"sqlite3 executemany": _sqlite_executemany, "multi-row INSERT": _sqlite_multirow}
        if database == "sqlite"
        else {
            "psycopg COPY (text)": _copy(False),
            "psycopg COPY (binary)": _copy(True),
            "psycopg COPY (text blocks)": _copy_text_blocks,
        }
    )
    best_real = float("inf")
    best = dict.fromkeys(baselines, float("inf"))
    written = 0
    verify_s = float("inf")
    with tempfile.TemporaryDirectory(prefix="p2pgrid-bench-ledger-") as tmp:
        workdir = Path(tmp)
        for round_ in range(rounds):
            with _fresh_engine(database, postgres_url, workdir, "settled") as engine:
                elapsed, written, store = _settle_all(engine, inputs, rules, clock)
                best_real = min(best_real, elapsed)
                start = time.perf_counter()
                report = store.verify(workers=default_verify_workers())
                verify_s = min(verify_s, time.perf_counter() - start)
                if report.transfers != written:
                    raise RuntimeError(f"verify saw {report.transfers} transfers, settlement wrote {written}")
                batches = _rows_by_interval(engine)
            timings = []
            for name, insert in baselines.items():
                seconds = _timed_baseline(database, postgres_url, workdir, batches, insert)
                best[name] = min(best[name], seconds)
                timings.append(f"{name} {seconds:.2f} s")
            progress(
                f"{database} round {round_ + 1}/{rounds}: settled {written} transfers in {elapsed:.2f} s; "
                + ", ".join(timings)
            )
    transfers_per_s = written / best_real
    result: dict[str, Any] = {
        "database": database,
        "transfers": written,
        "intervals": intervals,
        "participants": participants,
        "transfers_per_s": round(transfers_per_s),
    }
    # SQLite's one bulk path is executemany; PostgreSQL's COPY in whichever form was fastest.
    baseline = "sqlite3 executemany" if database == "sqlite" else min(best, key=best.__getitem__)
    baseline_per_s = written / best[baseline]
    result.update(
        baseline_per_s=round(baseline_per_s),
        ratio=round(transfers_per_s / baseline_per_s, 3),
        baseline=f"{baseline} of the same transfers and chain rows, one transaction per interval",
    )
    if database == "sqlite":
        multirow_per_s = written / best["multi-row INSERT"]
        result.update(
            multirow_per_s=round(multirow_per_s), multirow_ratio=round(transfers_per_s / multirow_per_s, 3)
        )
    else:
        result.update(
            copy_text_per_s=round(written / best["psycopg COPY (text)"]),
            copy_binary_per_s=round(written / best["psycopg COPY (binary)"]),
            copy_text_blocks_per_s=round(written / best["psycopg COPY (text blocks)"]),
        )
    result.update(
        verify_s_per_million=round(verify_s / written * 1e6, 2), verify_workers=default_verify_workers()
    )
    return result


def run(args: argparse.Namespace) -> int:
    databases = ["sqlite", "postgresql"] if args.database == "both" else [args.database]
    postgres_url = args.postgres_url or os.environ.get(
        "P2PGRID_BENCH_POSTGRES_URL", DEFAULT_BENCH_POSTGRES_URL
    )

    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    for database in databases:
        result = bench_database(
            database,
            participants=args.participants,
            intervals=args.intervals,
            rounds=args.rounds,
            postgres_url=postgres_url,
            progress=progress,
        )
        print(json.dumps(result), flush=True)
    return 0
