"""On SQLite the ledger inserts rows through multi-row statements of only a few lengths, each prepared once."""

from __future__ import annotations

import sqlite3
from typing import Any

from services.ledger.adapters.sql import _SqliteBackend


class _Recording:
    """A cursor that remembers the text of every statement it runs."""

    def __init__(self, cursor: sqlite3.Cursor) -> None:
        self.cursor = cursor
        self.texts: list[str] = []

    def execute(self, sql: str, params: Any = ()) -> Any:
        self.texts.append(sql)
        return self.cursor.execute(sql, params)


def test_rows_of_any_count_go_in_whole_through_statements_of_few_lengths() -> None:
    connection = sqlite3.connect(":memory:")
    connection.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT NOT NULL, c INTEGER NOT NULL)")
    backend = _SqliteBackend()
    recording = _Recording(connection.cursor())
    next_key = 0
    for count in [*range(0, 300), *range(300, 9000, 97)]:
        params: list[Any] = []
        for i in range(count):
            params += [next_key + i, f"row {next_key + i}", i]
        backend._insert_rows(recording, "t", ("a", "b", "c"), params)
        next_key += count
    assert connection.execute("SELECT COUNT(*), SUM(c) FROM t").fetchone()[0] == next_key
    assert connection.execute("SELECT MIN(a), MAX(a) FROM t").fetchone() == (0, next_key - 1)
    # Lengths: 13 × 256 (and its multiples that fit), 256·k for k < 13, 16·k for k < 16, and 1 to 15.
    assert len(set(recording.texts)) <= 1 + 12 + 15 + 15 + 2
    assert all(text.count("(?,?,?)") <= 30_000 // 3 for text in recording.texts)


def test_account_totals_are_upserted_through_the_same_few_lengths() -> None:
    connection = sqlite3.connect(":memory:")
    connection.execute(
        "CREATE TABLE accounts (account_id TEXT PRIMARY KEY, kind TEXT NOT NULL, "
        "debits_nano INTEGER NOT NULL, credits_nano INTEGER NOT NULL)"
    )
    backend = _SqliteBackend()
    recording = _Recording(connection.cursor())
    rows = [(f"participant:p{i}", "participant", i, 2 * i) for i in range(1000)]
    backend.write_accounts(recording, rows, [r[0] for r in rows])
    backend.write_accounts(recording, [(a, k, d + 1, c + 1) for a, k, d, c in rows[:999]], [])
    stored = dict(connection.execute("SELECT account_id, debits_nano FROM accounts").fetchall())
    assert len(stored) == 1000
    assert stored["participant:p0"] == 1 and stored["participant:p999"] == 999
    assert len(recording.texts) <= 8
