"""The store on a real database: after a failed transaction the writer reads its counters back and stays gap-free."""

from __future__ import annotations

import time

import pytest
from sqlalchemy import select

from services.order_book.adapters.store import BookStore, PlaceOp, orders_t
from services.order_book.domain.market import MarketRules
from services.order_book.domain.orders import OrderBody, Receipt, Side, SignedOrder
from services.platform.db import make_engine

RULES = MarketRules(900, 300, 96, 100, 100, 10**7, 10**7, frozenset({"n1"}))


def places(participant_id: str, *cids: str, start_s: int) -> list[PlaceOp]:
    return [
        PlaceOp(
            participant_id,
            [SignedOrder(OrderBody(cid, Side.BUY, "n1", start_s, 100, 100_000), bytes(64))],
            ["body"],
        )
        for cid in cids
    ]


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def test_a_commit_the_writer_did_not_see_is_healed_by_reading_the_counters_back(
    backend: str, request: pytest.FixtureRequest
) -> None:
    url = str(request.getfixturevalue("sqlite_url" if backend == "sqlite" else "postgres_url"))
    engine = make_engine(url)
    try:
        writer = BookStore(engine, RULES)
        writer.migrate()
        now_s = time.time()
        start_s = RULES.first_open_start_s(now_s) + 3600
        writer.open_book(RULES.first_open_start_s(now_s))
        writer.apply_ops(places("p1", "a", "b", "c", start_s=start_s), now_s)
        # Orders committed behind the writer's back, as after a COMMIT whose answer was lost.
        other = BookStore(engine, RULES)
        other.open_book(0)
        other.apply_ops(places("p2", "x", "y", start_s=start_s), now_s)

        # The writer's stale counter collides with the unseen orders: the driver refuses the duplicate key.
        with pytest.raises(Exception, match=r"(?i)unique|duplicate"):
            writer.apply_ops(places("p1", "d", start_s=start_s), now_s)
        ops = places("p1", "d", start_s=start_s)
        writer.apply_ops(ops, now_s)
        receipt = ops[0].results[0]
        assert isinstance(receipt, Receipt) and receipt.book_seq == 6
        with engine.connect() as conn:
            seqs = [
                row.book_seq
                for row in conn.execute(select(orders_t.c.book_seq).order_by(orders_t.c.book_seq))
            ]
        assert seqs == [1, 2, 3, 4, 5, 6]
    finally:
        writer.close()
        engine.dispose()


@pytest.mark.postgres
def test_the_writers_lookup_of_known_orders_is_planned_for_the_book_as_it_grows(postgres_url: str) -> None:
    # A statement PostgreSQL has prepared keeps its plan until the table is analysed again: planned
    # while the book was empty (a sequential scan), the writer's lookup of repeated client order ids
    # would scan the whole book on every later group. The lookup is therefore never prepared.
    engine = make_engine(postgres_url)
    writer = BookStore(engine, RULES)
    try:
        writer.migrate()
        now_s = time.time()
        start_s = RULES.first_open_start_s(now_s) + 3600
        writer.open_book(RULES.first_open_start_s(now_s))
        for group in range(12):
            writer.apply_ops(places("p1", f"c{group}", start_s=start_s), now_s)
        connection = writer._raw
        assert connection is not None
        with connection.cursor() as cursor:
            cursor.execute("SELECT statement FROM pg_prepared_statements")
            prepared = [row[0] for row in cursor.fetchall()]
        connection.rollback()
        assert not [statement for statement in prepared if "client_order_id = ANY" in statement]
        # Repeats are still answered from the stored orders.
        again = places("p1", "c3", start_s=start_s)
        writer.apply_ops(again, now_s)
        receipt = again[0].results[0]
        assert isinstance(receipt, Receipt) and receipt.book_seq == 4
    finally:
        writer.close()
        engine.dispose()
