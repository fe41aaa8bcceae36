"""Changes made directly in the database, behind the ledger's back, are all found by `p2pgrid ledger verify`.

An attacker with database access first disables the append-only triggers.
Then, on SQLite and on PostgreSQL: 1,000 random single-byte changes to any
stored value of the ledger's evidence (transfers, chain, checkpoints, Merkle
nodes, account totals), 100 deleted rows and 100 swapped rows. Each change is
made in a transaction, verified by the same function the CLI runs (reading
through that transaction), and rolled back, so one ledger serves all of them.
A few real CLI runs check the exit codes, and a forked checkpoint history is
rejected by the consistency check.

`settled_intervals` is bookkeeping for exactly-once settlement, not evidence:
its rows are not signed, so it is not among the tampered tables.
"""

from __future__ import annotations

import hashlib
import random
import sqlite3
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from ledger_testing import LEDGER_KEY
from sqlalchemy import Connection, Engine, exc, text

from services.ledger.adapters.sql import LedgerStore
from services.ledger.domain.audit import VerificationError
from services.ledger.domain.chain import entry_bytes
from services.ledger.domain.checkpoint import CheckpointError, verify_checkpoint_consistency
from services.ledger.domain.ledger import Transfer
from services.ledger.domain.merkle import leaf_hash
from services.ledger.domain.settlement import SettlementInputs, SettlementRules
from services.ledger.synthetic import SyntheticDay, synthetic_day
from services.platform.db import make_engine, postgres_schema

TABLES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "transfers": (
        ("seq",),
        (
            "seq",
            "transfer_id",
            "debit_account",
            "credit_account",
            "amount_nano",
            "code",
            "interval_start_s",
            "linked_group",
            "flags",
        ),
    ),
    "chain": (("seq",), ("seq", "transfer_id", "entry_hash", "chained_hash")),
    "checkpoints": (
        ("tree_size",),
        (
            "tree_size",
            "origin",
            "root_hash",
            "chain_head",
            "time_ms",
            "previous_hash",
            "public_key",
            "signature",
            "frontier",
        ),
    ),
    "merkle_nodes": (("level", "node_index"), ("level", "node_index", "hash")),
    "accounts": (("account_id",), ("account_id", "kind", "debits_nano", "credits_nano")),
}
SMALLINT = {("transfers", "flags"), ("merkle_nodes", "level")}
APPEND_ONLY = ("transfers", "chain", "merkle_nodes", "checkpoints", "settled_intervals")
LEDGER_KEY_PUBLIC = bytes(LEDGER_KEY.verify_key)


@dataclass
class Ledger:
    store: LedgerStore
    url: str
    rows: dict[str, list[dict[str, Any]]]


def settle(store: LedgerStore, day: SyntheticDay, intervals: range) -> None:
    rules = SettlementRules.from_mapping(day.rules)
    for k in intervals:
        store.settle_interval(SettlementInputs.from_json(day.recorded[k]), rules)


def build_ledger(store: LedgerStore, url: str) -> Ledger:
    """About 900 transfers in 11 checkpoints, with stored Merkle nodes and corrections; triggers then disabled."""
    day = synthetic_day(participants=40, intervals=8, seed=5)
    settle(store, day, range(8))
    rules = SettlementRules.from_mapping(day.rules)
    for recorded in day.late[:3]:
        store.settle_interval(SettlementInputs.from_json(recorded), rules)
    store.verify(trusted_public_key=store.public_key)
    with store.engine.begin() as conn:
        disable_triggers(conn)
    rows: dict[str, list[dict[str, Any]]] = {}
    with store.engine.connect() as conn:
        for table, (_key, columns) in TABLES.items():
            rows[table] = [
                dict(r._mapping) for r in conn.execute(text(f"SELECT {', '.join(columns)} FROM {table}"))
            ]
    assert len(rows["merkle_nodes"]) >= 2 and len(rows["checkpoints"]) >= 10
    return Ledger(store, url, rows)


def disable_triggers(conn: Connection) -> None:
    """What an attacker with database access does first."""
    if conn.dialect.name == "postgresql":
        for table in APPEND_ONLY:
            conn.execute(text(f"ALTER TABLE {table} DISABLE TRIGGER USER"))
    else:
        names = conn.execute(text("SELECT name FROM sqlite_master WHERE type = 'trigger'")).scalars().all()
        for name in names:
            conn.execute(text(f"DROP TRIGGER {name}"))


@contextmanager
def rolled_back(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        transaction = conn.begin()
        try:
            yield conn
        finally:
            transaction.rollback()


def one_byte_change(value: Any, rng: random.Random, smallint: bool) -> Any:
    if isinstance(value, bytes):
        data = bytearray(value)
        i = rng.randrange(len(data))
        data[i] = rng.choice([b for b in range(256) if b != data[i]])
        return bytes(data)
    if isinstance(value, str):
        i = rng.randrange(len(value))
        replacement = rng.choice([chr(c) for c in range(33, 127) if chr(c) != value[i]])
        return value[:i] + replacement + value[i + 1 :]
    assert isinstance(value, int)
    width = 2 if smallint else 8
    data = bytearray(value.to_bytes(width, "big", signed=True))
    i = rng.randrange(width)
    data[i] = rng.choice([b for b in range(256) if b != data[i]])
    return int.from_bytes(data, "big", signed=True)


def where(table: str, row: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    key = TABLES[table][0]
    return " AND ".join(f"{k} = :k_{k}" for k in key), {f"k_{k}": row[k] for k in key}


def expect_detected(ledger: Ledger, conn: Connection, what: str, found: Counter[str]) -> None:
    try:
        ledger.store.verify(connection=conn, trusted_public_key=ledger.store.public_key)
    except VerificationError as e:
        found[str(e).split(":")[0][:40]] += 1
        return
    pytest.fail(f"not detected: {what}")


def run_single_byte_changes(ledger: Ledger, count: int, rng: random.Random) -> Counter[str]:
    cells = [
        (table, row, column)
        for table, rows in ledger.rows.items()
        for row in rows
        for column in TABLES[table][1]
        if row[column] not in ("", b"")
    ]
    found: Counter[str] = Counter()
    done = 0
    while done < count:
        table, row, column = rng.choice(cells)
        value = one_byte_change(row[column], rng, (table, column) in SMALLINT)
        condition, params = where(table, row)
        with rolled_back(ledger.store.engine) as conn:
            try:
                conn.execute(
                    text(f"UPDATE {table} SET {column} = :v WHERE {condition}"), {"v": value, **params}
                )
            except exc.DBAPIError:
                continue  # e.g. a changed key that collides with another row: not a change one can make
            expect_detected(
                ledger, conn, f"{table}.{column} of {params}: {row[column]!r} -> {value!r}", found
            )
        done += 1
    return found


def run_deletions(ledger: Ledger, count: int, rng: random.Random) -> Counter[str]:
    found: Counter[str] = Counter()
    tables = list(TABLES)
    for i in range(count):
        table = tables[i % len(tables)]
        row = rng.choice(ledger.rows[table])
        condition, params = where(table, row)
        with rolled_back(ledger.store.engine) as conn:
            assert conn.execute(text(f"DELETE FROM {table} WHERE {condition}"), params).rowcount == 1
            expect_detected(ledger, conn, f"deleted {table} {params}", found)
    return found


def run_swaps(ledger: Ledger, count: int, rng: random.Random) -> Counter[str]:
    """Swap everything but the key between two rows: as if the rows had traded places."""
    found: Counter[str] = Counter()
    tables = list(TABLES)
    done = 0
    while done < count:
        table = tables[done % len(tables)]
        key, columns = TABLES[table]
        a, b = rng.sample(ledger.rows[table], 2)
        payload = [c for c in columns if c not in key]
        if all(a[c] == b[c] for c in payload):
            continue
        where_a, params_a = where(table, a)
        where_b, params_b = where(table, b)
        sets = ", ".join(f"{c} = :v_{c}" for c in payload)
        with rolled_back(ledger.store.engine) as conn:
            if table == "transfers":  # transfer_id is unique: park one while swapping
                conn.execute(text(f"UPDATE transfers SET transfer_id = 'parked' WHERE {where_a}"), params_a)
            conn.execute(
                text(f"UPDATE {table} SET {sets} WHERE {where_b}"),
                {**{f"v_{c}": a[c] for c in payload}, **params_b},
            )
            conn.execute(
                text(f"UPDATE {table} SET {sets} WHERE {where_a}"),
                {**{f"v_{c}": b[c] for c in payload}, **params_a},
            )
            expect_detected(ledger, conn, f"swapped {table} {params_a} and {params_b}", found)
        done += 1
    return found


def run_cli_verify(url: str, key: bytes) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "services.cli",
            "ledger",
            "verify",
            "--database-url",
            url,
            "--key",
            key.hex(),
            "--quiet",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def check_all_tampering(ledger: Ledger, seed: int) -> None:
    rng = random.Random(seed)
    changes = run_single_byte_changes(ledger, 1000, rng)
    deletions = run_deletions(ledger, 100, rng)
    swaps = run_swaps(ledger, 100, rng)
    assert sum(changes.values()) == 1000
    assert sum(deletions.values()) == 100
    assert sum(swaps.values()) == 100
    # The untouched ledger still verifies: every change above was rolled back.
    ledger.store.verify(trusted_public_key=ledger.store.public_key)


@pytest.mark.slow
def test_every_tampering_of_a_sqlite_ledger_is_detected(
    sqlite_url: str, make_store: Callable[[str], LedgerStore], tmp_path: Path
) -> None:
    ledger = build_ledger(make_store(sqlite_url), sqlite_url)
    check_all_tampering(ledger, seed=1)

    # Real CLI runs: the intact ledger passes, a copy with one changed amount fails, naming it.
    ok = run_cli_verify(sqlite_url, ledger.store.public_key)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.startswith("OK:")
    copy = tmp_path / "tampered.db"
    source = sqlite3.connect(sqlite_url.removeprefix("sqlite:///"))
    target = sqlite3.connect(copy)
    source.backup(target)
    source.close()
    target.execute("UPDATE transfers SET amount_nano = amount_nano + 1 WHERE seq = 42")
    target.commit()
    target.close()
    bad = run_cli_verify(f"sqlite:///{copy}", ledger.store.public_key)
    assert bad.returncode == 1
    assert "FAIL: transfer seq 42: its entry hash does not match the chain" in bad.stderr
    wrong_key = run_cli_verify(sqlite_url, bytes(32))
    assert wrong_key.returncode == 1
    assert "not by the trusted ledger key" in wrong_key.stderr


@pytest.mark.slow
@pytest.mark.postgres
def test_every_tampering_of_a_postgresql_ledger_is_detected(
    postgres_url: str, make_store: Callable[[str], LedgerStore]
) -> None:
    ledger = build_ledger(make_store(postgres_url), postgres_url)
    check_all_tampering(ledger, seed=2)

    ok = run_cli_verify(postgres_url, ledger.store.public_key)
    assert ok.returncode == 0, ok.stderr
    with ledger.store.engine.begin() as conn:
        conn.execute(text("DELETE FROM chain WHERE seq = 7"))
    bad = run_cli_verify(postgres_url, ledger.store.public_key)
    assert bad.returncode == 1
    assert "FAIL: chain: no row for seq 7" in bad.stderr


def test_the_append_only_rules_stop_the_same_changes_until_disabled(
    sqlite_url: str, make_store: Callable[[str], LedgerStore]
) -> None:
    store = make_store(sqlite_url)
    settle(store, synthetic_day(participants=10, intervals=1), range(1))
    with pytest.raises(exc.DBAPIError, match="append-only"), store.engine.begin() as conn:
        conn.execute(text("UPDATE transfers SET amount_nano = amount_nano + 1 WHERE seq = 1"))
    with pytest.raises(exc.DBAPIError, match="append-only"), store.engine.begin() as conn:
        conn.execute(text("DELETE FROM chain WHERE seq = 1"))
    store.verify(trusted_public_key=store.public_key)


def fork_stores(
    database_url: str, make_store: Callable[[str], LedgerStore], tmp_path: Path
) -> Iterator[tuple[LedgerStore, LedgerStore]]:
    if database_url.startswith("sqlite"):
        yield make_store(database_url), make_store(f"sqlite:///{tmp_path / 'fork.db'}")
        return
    base = database_url.split("?", 1)[0]
    with postgres_schema(base, "ledger_fork") as schema:
        engine = make_engine(base, schema=schema)
        engine.dispose()
        yield make_store(database_url), make_store(f"{base}?options=-csearch_path%3D{schema}")


def test_a_forked_checkpoint_history_is_rejected_by_the_consistency_check(
    database_url: str, make_store: Callable[[str], LedgerStore], tmp_path: Path
) -> None:
    day = synthetic_day(participants=20, intervals=4, seed=3)
    other = synthetic_day(participants=20, intervals=4, seed=4)
    for original, fork in fork_stores(database_url, make_store, tmp_path):
        settle(original, day, range(3))
        held = original.latest_checkpoint()  # what a participant kept from the ledger at that time
        assert held is not None
        settle(original, day, range(3, 4))
        # The fork shares the first two intervals, then books a different third one, signed with the same key.
        settle(fork, day, range(2))
        rules = SettlementRules.from_mapping(day.rules)
        changed = dict(other.recorded[2], interval_start_s=day.recorded[2]["interval_start_s"])
        fork.settle_interval(SettlementInputs.from_json(changed), rules)
        settle(fork, day, range(3, 4))

        key = original.public_key
        honest = original.latest_checkpoint()
        forked = fork.latest_checkpoint()
        assert honest is not None and forked is not None
        verify_checkpoint_consistency(
            held, honest, original.consistency_proof(held.tree_size, honest.tree_size), key
        )
        proof = fork.consistency_proof(held.tree_size, forked.tree_size)
        with pytest.raises(CheckpointError, match="does not extend"):
            verify_checkpoint_consistency(held, forked, proof, key)
        # Both ledgers verify on their own: only the held checkpoint exposes the fork.
        original.verify(trusted_public_key=key)
        fork.verify(trusted_public_key=key)


def copy_sqlite(url: str, target: Path) -> str:
    source = sqlite3.connect(url.removeprefix("sqlite:///"))
    copy = sqlite3.connect(target)
    source.backup(copy)
    source.close()
    copy.close()
    return f"sqlite:///{target}"


def rewrite_chain_from(url: str, seq: int) -> None:
    """A careful attacker: change a transfer, then recompute every entry and chained hash after it."""
    db = sqlite3.connect(url.removeprefix("sqlite:///"))
    for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
        db.execute(f"DROP TRIGGER {name}")
    db.execute("UPDATE transfers SET amount_nano = amount_nano + 1 WHERE seq = ?", (seq,))
    (head,) = db.execute("SELECT chained_hash FROM chain WHERE seq = ?", (seq - 1,)).fetchone()
    rows = db.execute(
        "SELECT seq, transfer_id, debit_account, credit_account, amount_nano, code, interval_start_s, linked_group, flags "
        "FROM transfers WHERE seq >= ? ORDER BY seq",
        (seq,),
    ).fetchall()
    for row in rows:
        entry = leaf_hash(entry_bytes(Transfer(*row[1:])))
        head = hashlib.sha256(head + entry).digest()
        db.execute("UPDATE chain SET entry_hash = ?, chained_hash = ? WHERE seq = ?", (entry, head, row[0]))
    db.commit()
    db.close()


def verify_message(url: str, workers: int) -> str:
    engine = make_engine(url)
    try:
        LedgerStore(engine).verify(trusted_public_key=LEDGER_KEY_PUBLIC, workers=workers, min_range=100)
    except VerificationError as e:
        return str(e)
    finally:
        engine.dispose()
    return "verified"


def test_verifying_in_parallel_ranges_finds_what_one_process_finds(
    sqlite_url: str, make_store: Callable[[str], LedgerStore], tmp_path: Path
) -> None:
    store = make_store(sqlite_url)
    settle(store, synthetic_day(participants=40, intervals=8, seed=5), range(8))
    one = store.verify(trusted_public_key=store.public_key)
    assert store.verify(trusted_public_key=store.public_key, workers=3, min_range=100) == one
    for i, seq in enumerate((one.transfers - 5, one.transfers // 2, 3)):
        plain = copy_sqlite(sqlite_url, tmp_path / f"plain{i}.db")
        with sqlite3.connect(plain.removeprefix("sqlite:///")) as db:
            for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'").fetchall():
                db.execute(f"DROP TRIGGER {name}")
            db.execute("UPDATE transfers SET amount_nano = amount_nano + 1 WHERE seq = ?", (seq,))
        assert verify_message(plain, 1) == verify_message(plain, 3)
        assert f"transfer seq {seq}: its entry hash does not match" in verify_message(plain, 3)
        careful = copy_sqlite(sqlite_url, tmp_path / f"careful{i}.db")
        rewrite_chain_from(careful, seq)
        message = verify_message(careful, 3)
        assert message == verify_message(careful, 1)
        assert "the chain head differs from the signed one" in message
