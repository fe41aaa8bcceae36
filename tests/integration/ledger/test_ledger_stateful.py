"""A hypothesis state machine drives well over 100,000 transfers through a real SQLite ledger in big batches.

Each batch mixes new transfers, linked groups, exact repeats, repeats with a
different body, groups with a bad member, groups that partly exist, repeats
inside the batch and amounts at the limits (1 and 2**63 − 1, which overflow
an account's totals on the second use). After every batch the database must
agree with an independent model: balances sum to zero, no id is stored twice,
and every linked group is stored completely or not at all.
"""

from __future__ import annotations

import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule, run_state_machine_as_test
from ledger_testing import LATE_CLOCK, LEDGER_KEY
from sqlalchemy import text

from services.ledger.adapters.sql import LedgerStore, migrate_ledger
from services.ledger.domain.ledger import MAX_AMOUNT_NANO, Transfer
from services.platform.db import make_engine

ACCOUNTS = [f"participant:p{i}" for i in range(24)] + ["market:m", "grid_operator:g", "utility:u"]
BIG = ["participant:whale", "participant:orca"]  # where amounts at the upper limit go
TOTAL_SUBMITTED = Counter[str]()


class Model:
    """The batch semantics, written independently of services.ledger.domain.ledger.plan_batch."""

    def __init__(self) -> None:
        self.stored: dict[str, Transfer] = {}
        self.totals: dict[str, list[int]] = {}
        self.groups: dict[str, list[Transfer]] = {}  # group id → members, for every group that was stored
        self.standalone: list[Transfer] = []

    def apply(self, batch: list[Transfer]) -> list[str]:
        statuses: list[str] = []
        closed: set[str] = set()
        i = 0
        while i < len(batch):
            group = batch[i].linked_group
            j = i + 1
            while group and j < len(batch) and batch[j].linked_group == group:
                j += 1
            members = batch[i:j]
            statuses.extend(self._apply_group(members, group, closed))
            closed.add(group)
            i = j
        return statuses

    def _apply_group(self, members: list[Transfer], group: str, closed: set[str]) -> list[str]:
        n = len(members)
        ids = [m.transfer_id for m in members]
        bad = (
            (group and (group in closed or ids[0] != group))
            or len(set(ids)) != n
            or any(
                not 1 <= m.amount_nano <= MAX_AMOUNT_NANO or m.debit_account == m.credit_account
                for m in members
            )
            or any(m.transfer_id in self.stored and self.stored[m.transfer_id] != m for m in members)
        )
        if bad:
            return ["rejected"] * n
        known = sum(m.transfer_id in self.stored for m in members)
        if known == n:
            return ["exists"] * n
        if known:
            return ["rejected"] * n
        trial = {a: list(v) for a, v in self.totals.items()}
        for m in members:
            trial.setdefault(m.debit_account, [0, 0])[0] += m.amount_nano
            trial.setdefault(m.credit_account, [0, 0])[1] += m.amount_nano
        if any(d > MAX_AMOUNT_NANO or c > MAX_AMOUNT_NANO for d, c in trial.values()):
            return ["rejected"] * n
        self.totals = trial
        for m in members:
            self.stored[m.transfer_id] = m
        if group:
            self.groups[group] = members
        else:
            self.standalone.extend(members)
        return ["created"] * n


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="ledger-stateful-"))
        self.engine = make_engine(f"sqlite:///{self.tmp / 'ledger.db'}")
        migrate_ledger(self.engine)
        self.store = LedgerStore(self.engine, LEDGER_KEY, clock=LATE_CLOCK)
        self.model = Model()
        self.next_id = 0
        self.submitted_groups: dict[str, int] = {}

    def new_id(self) -> str:
        self.next_id += 1
        return f"h{self.next_id}"

    def transfer(self, rng: random.Random, *, group: str = "", tid: str | None = None) -> Transfer:
        tid = tid or self.new_id()
        if rng.random() < 0.03:
            debit, credit = rng.sample(BIG, 2)
            amount = rng.choice([MAX_AMOUNT_NANO, MAX_AMOUNT_NANO - 1, 1])
        else:
            debit, credit = rng.sample(ACCOUNTS, 2)
            amount = rng.choice([1, 2, rng.randrange(1, 10**6), rng.randrange(1, 10**15)])
        return Transfer(
            tid, debit, credit, amount, "test", rng.randrange(0, 4) * 900, group, rng.choice([0, 0, 1, 2])
        )

    def group(self, rng: random.Random, size: int) -> list[Transfer]:
        first = self.new_id()
        members = [self.transfer(rng, group=first, tid=first)]
        members += [self.transfer(rng, group=first) for _ in range(size - 1)]
        self.submitted_groups[first] = size
        return members

    def make_batch(self, rng: random.Random, size: int) -> list[Transfer]:
        standalone = self.model.standalone
        groups = list(self.model.groups.values())
        batch: list[Transfer] = []
        while len(batch) < size:
            kind = rng.random()
            if (kind < 0.65 and kind >= 0.45) or (kind >= 0.65 and not (standalone and groups)):
                batch.extend(self.group(rng, rng.randrange(2, 7)))
            elif kind < 0.45:
                batch.append(self.transfer(rng))
            elif kind < 0.70:  # exact repeat of a stored transfer
                batch.append(rng.choice(standalone))
            elif kind < 0.75:  # exact repeat of a whole stored group
                batch.extend(rng.choice(groups))
            elif kind < 0.80:  # same id, different body
                old = rng.choice(standalone)
                batch.append(old._replace(amount_nano=old.amount_nano % MAX_AMOUNT_NANO + 1))
            elif kind < 0.85:  # a group with one bad member
                members = self.group(rng, rng.randrange(2, 6))
                k = rng.randrange(len(members))
                members[k] = members[k]._replace(amount_nano=rng.choice([0, -5, MAX_AMOUNT_NANO + 1]))
                batch.extend(members)
            elif kind < 0.90:  # a stored group with one more member: it partly exists
                members = rng.choice(groups)
                batch.extend([*members, self.transfer(rng, group=members[0].transfer_id)])
            elif kind < 0.95 and batch:  # a repeat inside the batch
                batch.append(rng.choice(batch))
            else:  # debit and credit the same account
                batch.append(
                    self.transfer(rng)._replace(
                        debit_account="participant:p1", credit_account="participant:p1"
                    )
                )
        return batch

    @rule(seed=st.integers(0, 2**32 - 1), size=st.integers(8_000, 14_000))
    def apply_a_batch(self, seed: int, size: int) -> None:
        rng = random.Random(seed)
        batch = self.make_batch(rng, size)
        outcome = self.store.apply_transfers(batch)
        expected = self.model.apply(batch)
        got = [r.status.value for r in outcome.results]
        assert got == expected, next(
            (i, batch[i], got[i], expected[i], outcome.results[i].reason)
            for i in range(len(batch))
            if got[i] != expected[i]
        )
        TOTAL_SUBMITTED["transfers"] += len(batch)
        TOTAL_SUBMITTED["created"] += expected.count("created")
        TOTAL_SUBMITTED["exists"] += expected.count("exists")
        TOTAL_SUBMITTED["rejected"] += expected.count("rejected")

    @invariant()
    def the_database_agrees_with_the_model(self) -> None:
        with self.engine.connect() as conn:
            accounts = conn.execute(text("SELECT account_id, debits_nano, credits_nano FROM accounts")).all()
            rows, distinct = conn.execute(
                text("SELECT COUNT(*), COUNT(DISTINCT transfer_id) FROM transfers")
            ).one()
            group_counts: dict[str, int] = dict(
                conn.execute(  # type: ignore[arg-type]
                    text(
                        "SELECT linked_group, COUNT(*) FROM transfers WHERE linked_group != '' GROUP BY linked_group"
                    )
                ).all()
            )
        assert sum(c for _a, _d, c in accounts) - sum(d for _a, d, _c in accounts) == 0
        assert {a: [d, c] for a, d, c in accounts} == {a: v for a, v in self.model.totals.items()}
        assert rows == distinct == len(self.model.stored)
        # Every linked group is there completely or not at all.
        for group, size in self.submitted_groups.items():
            assert group_counts.get(group, 0) in (0, size), group
        assert group_counts == {g: len(m) for g, m in self.model.groups.items()}

    def teardown(self) -> None:
        try:
            report = self.store.verify(trusted_public_key=self.store.public_key)
            assert report.transfers == len(self.model.stored)
        finally:
            self.engine.dispose()
            shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.mark.slow
def test_a_hundred_thousand_random_transfers_keep_the_ledger_invariants() -> None:
    TOTAL_SUBMITTED.clear()
    run_state_machine_as_test(
        LedgerMachine,
        settings=settings(
            max_examples=4,
            stateful_step_count=5,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
        ),
    )
    assert TOTAL_SUBMITTED["created"] >= 100_000, TOTAL_SUBMITTED
    assert min(TOTAL_SUBMITTED["created"], TOTAL_SUBMITTED["exists"], TOTAL_SUBMITTED["rejected"]) > 1_000
