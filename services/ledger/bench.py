"""`p2pgrid bench ledger`: settlement write speed against a bulk insert of the same rows, and verify speed.

Per database one JSON line:

- `transfers_per_s`: transfers written by `settle_interval` over a synthetic
  day (validation, settlement rules, ids, hashing, Merkle nodes, account
  totals, balance check, signed checkpoint; one transaction per interval).
- `baseline_per_s`: the same transfers and chain rows, taken from that run,
  inserted into a fresh ledger schema (same tables, indexes and triggers) in
  the same per-interval transactions with SQLAlchemy Core `insert()` and
  executemany, with nothing else to do. `ratio` = transfers_per_s / baseline_per_s.
- `driver_baseline_per_s` / `driver_ratio`: the same rows through the
  driver's own bulk path (sqlite3 `executemany`, psycopg `COPY`), for a
  harder comparison.
- `verify_s_per_million`: seconds `p2pgrid ledger verify` needs per million
  transfers (its verification, with its default number of worker processes),
  measured on the settled ledger.

Each measurement is the best of `--rounds` runs, alternating real and baseline.
"""

from __future__ import annotations

import argparse
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


def _core_insert(engine: Engine, batches: Sequence[Batch]) -> float:
    """SQLAlchemy Core insert() with executemany, one transaction per interval."""
    as_dicts = [
        (
            [dict(zip(TRANSFER_COLUMNS, r, strict=True)) for r in t],
            [dict(zip(CHAIN_COLUMNS, r, strict=True)) for r in c],
        )
        for t, c in batches
    ]
    start = time.perf_counter()
    for transfer_rows, chain_rows in as_dicts:
        with engine.begin() as conn:
            conn.execute(transfers_table.insert(), transfer_rows)
            conn.execute(chain_table.insert(), chain_rows)
    return time.perf_counter() - start


def _driver_insert(engine: Engine, batches: Sequence[Batch]) -> float:
    """The driver's bulk path: sqlite3 executemany, psycopg COPY; one transaction per interval."""
    postgres = engine.dialect.name == "postgresql"
    transfer_cols = ",".join(TRANSFER_COLUMNS)
    chain_cols = ",".join(CHAIN_COLUMNS)
    start = time.perf_counter()
    for transfer_rows, chain_rows in batches:
        with engine.begin() as conn:
            cursor: Any = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            if postgres:
                with cursor.copy(f"COPY transfers ({transfer_cols}) FROM STDIN") as copy:
                    for row in transfer_rows:
                        copy.write_row(row)
                with cursor.copy(f"COPY chain ({chain_cols}) FROM STDIN") as copy:
                    for row in chain_rows:
                        copy.write_row(row)
            else:
                cursor.executemany(
                    f"INSERT INTO transfers ({transfer_cols}) VALUES ({','.join('?' * len(TRANSFER_COLUMNS))})",
                    transfer_rows,
                )
                cursor.executemany(
                    f"INSERT INTO chain ({chain_cols}) VALUES ({','.join('?' * len(CHAIN_COLUMNS))})",
                    chain_rows,
                )
    return time.perf_counter() - start


def _timed_baseline(
    database: str,
    postgres_url: str,
    workdir: Path,
    name: str,
    batches: Sequence[Batch],
    insert: Callable[..., float],
) -> float:
    with _fresh_engine(database, postgres_url, workdir, name) as engine:
        migrate_ledger(engine)
        return insert(engine, batches)


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
    best_real = best_core = best_driver = float("inf")
    written = 0
    verify_s = float("inf")
    with tempfile.TemporaryDirectory(prefix="p2pgrid-bench-ledger-") as tmp:
        workdir = Path(tmp)
        for round_ in range(rounds):
            with _fresh_engine(database, postgres_url, workdir, "settled") as engine:
                elapsed, written, store = _settle_all(engine, inputs, rules, clock)
                best_real = min(best_real, elapsed)
                progress(f"{database} round {round_ + 1}: settled {written} transfers in {elapsed:.2f} s")
                start = time.perf_counter()
                report = store.verify(workers=default_verify_workers())
                verify_s = min(verify_s, time.perf_counter() - start)
                if report.transfers != written:
                    raise RuntimeError(f"verify saw {report.transfers} transfers, settlement wrote {written}")
                batches = _rows_by_interval(engine)
            core = _timed_baseline(database, postgres_url, workdir, "core", batches, _core_insert)
            driver = _timed_baseline(database, postgres_url, workdir, "driver", batches, _driver_insert)
            best_core = min(best_core, core)
            best_driver = min(best_driver, driver)
            progress(f"{database} round {round_ + 1}: core insert {core:.2f} s, driver insert {driver:.2f} s")
    transfers_per_s = written / best_real
    baseline_per_s = written / best_core
    driver_per_s = written / best_driver
    return {
        "database": database,
        "transfers": written,
        "intervals": intervals,
        "participants": participants,
        "transfers_per_s": round(transfers_per_s),
        "baseline_per_s": round(baseline_per_s),
        "ratio": round(transfers_per_s / baseline_per_s, 3),
        "baseline": "sqlalchemy core insert executemany of the same transfers and chain rows",
        "driver_baseline_per_s": round(driver_per_s),
        "driver_ratio": round(transfers_per_s / driver_per_s, 3),
        "driver_baseline": "psycopg COPY" if database == "postgresql" else "sqlite3 executemany",
        "verify_s_per_million": round(verify_s / written * 1e6, 2),
        "verify_workers": default_verify_workers(),
    }


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
