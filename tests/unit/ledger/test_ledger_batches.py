"""Applying batches of transfers: repeats, conflicts, linked groups, limits and the balance invariant."""

from __future__ import annotations

import pytest

from services.ledger.domain.chain import entry_bytes, entry_text, parse_entry
from services.ledger.domain.ledger import (
    MAX_AMOUNT_NANO,
    AccountKind,
    AccountTotals,
    BalanceInvariantError,
    Transfer,
    TransferError,
    account_id,
    account_kind,
    check_balance_sum,
    check_transfer,
    plan_batch,
    plan_new_group,
)

A = "participant:alice"
B = "participant:bob"
M = "market:demo"


def t(tid: str, amount: int = 10, debit: str = A, credit: str = B, group: str = "") -> Transfer:
    return Transfer(tid, debit, credit, amount, "test", 0, group, 0)


def statuses(plan) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.status.value for r in plan.results]


def test_a_batch_of_new_transfers_is_appended_and_moves_the_totals() -> None:
    plan = plan_batch([t("a", 5), t("b", 7, B, M)], {}, {})
    assert statuses(plan) == ["created", "created"]
    assert plan.appended == (t("a", 5), t("b", 7, B, M))
    assert plan.totals == {A: AccountTotals(5, 0), B: AccountTotals(7, 5), M: AccountTotals(0, 7)}
    assert plan.new_accounts == (A, B, M)


def test_a_repeated_id_with_the_same_body_changes_nothing_and_answers_exists() -> None:
    plan = plan_batch(
        [t("a", 5), t("a", 5)], {"a": t("a", 5)}, {A: AccountTotals(5, 0), B: AccountTotals(0, 5)}
    )
    assert statuses(plan) == ["exists", "exists"]
    assert plan.appended == ()
    assert plan.totals == {}


def test_a_repeat_within_one_batch_is_applied_once() -> None:
    plan = plan_batch([t("a", 5), t("a", 5)], {}, {})
    assert statuses(plan) == ["created", "exists"]
    assert plan.appended == (t("a", 5),)


def test_a_repeated_id_with_a_different_body_is_rejected_and_names_the_id() -> None:
    plan = plan_batch([t("a", 6)], {"a": t("a", 5)}, {})
    assert statuses(plan) == ["rejected"]
    assert "'a' exists with a different body" in plan.results[0].reason
    assert plan.appended == ()


def test_a_linked_group_with_one_bad_member_is_rejected_as_a_whole() -> None:
    batch = [t("g", 5, group="g"), t("h", 0, group="g"), t("i", 5, group="g"), t("solo", 1)]
    plan = plan_batch(batch, {}, {})
    assert statuses(plan) == ["rejected", "rejected", "rejected", "created"]
    assert "amount_nano 0" in plan.results[1].reason
    assert "linked transfer 'h' was rejected" in plan.results[0].reason
    assert plan.appended == (t("solo", 1),)
    assert plan.totals == {A: AccountTotals(1, 0), B: AccountTotals(0, 1)}


def test_a_linked_group_that_partly_exists_is_rejected() -> None:
    plan = plan_batch([t("g", 5, group="g"), t("h", 6, group="g")], {"g": t("g", 5, group="g")}, {})
    assert statuses(plan) == ["rejected", "rejected"]
    assert "partly exists" in plan.results[0].reason


def test_a_linked_group_must_be_named_after_its_first_transfer_and_be_consecutive() -> None:
    plan = plan_batch([t("x", 5, group="g"), t("g", 6, group="g")], {}, {})
    assert statuses(plan) == ["rejected", "rejected"]
    assert "first transfer" in plan.results[0].reason
    plan = plan_batch([t("g", 1, group="g"), t("solo", 1), t("h", 1, group="g")], {}, {})
    assert statuses(plan) == ["created", "created", "rejected"]
    assert "appears twice" in plan.results[2].reason


def test_a_transfer_that_would_overflow_an_account_rejects_its_group_and_leaves_totals_alone() -> None:
    totals = {A: AccountTotals(MAX_AMOUNT_NANO - 10, 0), B: AccountTotals(0, MAX_AMOUNT_NANO - 10)}
    plan = plan_batch([t("g", 10, group="g"), t("h", 1, group="g"), t("ok", 10, B, M)], {}, totals)
    assert statuses(plan) == ["rejected", "rejected", "created"]
    assert "would exceed" in plan.results[1].reason
    assert plan.totals == {B: AccountTotals(10, MAX_AMOUNT_NANO - 10), M: AccountTotals(0, 10)}


def test_amounts_at_the_limits_are_accepted_and_beyond_them_rejected() -> None:
    plan = plan_batch([t("one", 1), t("max", MAX_AMOUNT_NANO, B, M)], {}, {})
    assert statuses(plan) == ["created", "created"]
    plan = plan_batch([t("over", MAX_AMOUNT_NANO + 1), t("neg", -1), t("bool", True)], {}, {})
    assert statuses(plan) == ["rejected"] * 3


@pytest.mark.parametrize(
    ("transfer", "field"),
    [
        (Transfer("", A, B, 1, "test"), "transfer_id"),
        (Transfer("a|b", A, B, 1, "test"), "transfer_id"),
        (Transfer("a", "alice", B, 1, "test"), "debit_account"),
        (Transfer("a", A, "bank:x", 1, "test"), "credit_account"),
        (Transfer("a", A, A, 1, "test"), "must differ"),
        (Transfer("a", A, B, 1, "Test"), "code"),
        (Transfer("a", A, B, 1, "test", -900), "interval_start_s"),
        (Transfer("a", A, B, 1, "test", 0, "x|y"), "linked_group"),
        (Transfer("a", A, B, 1, "test", 0, "", 256), "flags"),
    ],
)
def test_a_malformed_transfer_is_refused_naming_the_field(transfer: Transfer, field: str) -> None:
    with pytest.raises(TransferError, match=field):
        check_transfer(transfer)


def test_the_trusted_group_plan_equals_the_general_plan() -> None:
    batch = [t("g", 5, group="g"), t("h", 7, B, M, group="g"), t("i", 2, M, A, group="g")]
    totals = {A: AccountTotals(1, 2)}
    general = plan_batch(batch, {}, totals, checked=True)
    fast, new_accounts = plan_new_group(batch, totals)
    assert fast == general.totals
    assert new_accounts == general.new_accounts == (B, M)
    with pytest.raises(TransferError, match="exceed"):
        plan_new_group([t("x", MAX_AMOUNT_NANO)], totals)


def test_a_nonzero_balance_sum_raises_the_invariant_error() -> None:
    check_balance_sum([(5, 0), (0, 5)], where="test")
    with pytest.raises(BalanceInvariantError, match="not zero"):
        check_balance_sum([(5, 0), (0, 4)], where="test")
    assert not issubclass(BalanceInvariantError, ValueError)


def test_account_ids_carry_their_kind() -> None:
    assert account_id(AccountKind.GRID_OPERATOR, "dso") == "grid_operator:dso"
    assert account_kind("utility:ewz") is AccountKind.UTILITY
    with pytest.raises(ValueError):
        account_kind("bank:x")


def test_the_entry_encoding_is_canonical_and_parses_back() -> None:
    transfer = Transfer(
        "1748736000.abc.tp", A, M, 123, "trade.purchase", 1_748_736_000, "1748736000.abc.tp", 3
    )
    assert entry_text(transfer) == (
        "p2pgrid-transfer-v1|1748736000.abc.tp|participant:alice|market:demo|123|trade.purchase|"
        "1748736000|1748736000.abc.tp|3"
    )
    assert parse_entry(entry_bytes(transfer).decode()) == transfer
    for bad in [
        entry_text(transfer).replace("|123|", "|0123|"),
        entry_text(transfer).replace("|123|", "|0|"),
        entry_text(transfer) + "|",
        entry_text(transfer).replace("v1", "v2"),
    ]:
        with pytest.raises(TransferError):
            parse_entry(bad)


def test_fields_of_the_wrong_type_are_refused_not_crashed_on() -> None:
    odd = [
        Transfer(["x"], A, B, 1, "test"),  # type: ignore[arg-type]
        Transfer("y", A, B, 1, "test", 0, ["g"]),  # type: ignore[arg-type]
        Transfer("z", A, B, "1", "test"),  # type: ignore[arg-type]
        t("ok", 3),
    ]
    plan = plan_batch(odd, {}, {})
    assert statuses(plan) == ["rejected", "rejected", "rejected", "created"]
