"""The double-entry ledger's rules: accounts, transfers, and how a batch of transfers is applied.

Guarantees
----------
1. Every transfer moves a positive integer `amount_nano` (1 ≤ amount ≤ 2**63 − 1)
   from its debit account to a different credit account. An account's
   `debits_nano` and `credits_nano` totals never exceed 2**63 − 1; a transfer
   that would overflow one is rejected, never wrapped or rounded.
2. The sum of all balances (credits − debits) is zero after every batch. It is
   checked after every batch against what was written, and a failed check
   raises `BalanceInvariantError`, which stops the service loudly.
3. At most one transfer per transfer id. Submitting an id again with the same
   body is harmless and answers with the first transfer; the same id with a
   different body is rejected.
4. Linked transfers (consecutive transfers sharing a `linked_group`, which is
   the id of the group's first transfer) are applied all together or not at
   all: if one member is rejected, so is every other member, and a group that
   partly exists already is rejected as a whole.
5. Transfers are never updated or deleted. A mistake is corrected only by new
   transfers (flag `FLAG_CORRECTION`), so the history stays as it was.
6. Every transfer is appended to a hash chain and a Merkle tree (see
   `chain.py`, `merkle.py`); each batch ends with a signed checkpoint
   (`checkpoint.py`), so anyone holding a checkpoint can prove that no
   transfer it covers was changed, removed or reordered.

The functions here are pure: `plan_batch` decides, from the transfers already
stored and the current account totals, which transfers of a batch are
created, which are repeats and which are rejected, and what the new totals
are. The storage adapter only writes what the plan says.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import NamedTuple

from services.ledger.domain.hashing import native

MAX_AMOUNT_NANO = 2**63 - 1
"""The largest amount of one transfer and the largest debits or credits total of one account."""

MAX_INTERVAL_START_S = 2**63 - 1

FLAG_ESTIMATED = 1
"""The transfer rests on estimated meter data and may be corrected when measured data arrives."""
FLAG_CORRECTION = 2
"""The transfer corrects earlier transfers of the same interval (a later settlement revision)."""
MAX_FLAGS = 255

TRANSFER_ID_PATTERN = r"[A-Za-z0-9._:\-]{1,64}"
ACCOUNT_NAME_PATTERN = r"[A-Za-z0-9._\-]{1,100}"
CODE_PATTERN = r"[a-z][a-z0-9_.]{0,31}"
_TRANSFER_ID_RE = re.compile(TRANSFER_ID_PATTERN)
_ACCOUNT_NAME_RE = re.compile(ACCOUNT_NAME_PATTERN)
_CODE_RE = re.compile(CODE_PATTERN)


class AccountKind(StrEnum):
    """Who holds an account. The kind is the prefix of the account id: `participant:p3f…`."""

    PARTICIPANT = "participant"
    MARKET = "market"
    GRID_OPERATOR = "grid_operator"
    UTILITY = "utility"


ACCOUNT_ID_PATTERN = rf"(?:{'|'.join(k.value for k in AccountKind)}):{ACCOUNT_NAME_PATTERN}"
_ACCOUNT_ID_RE = re.compile(ACCOUNT_ID_PATTERN)


class LedgerError(Exception):
    """Base class of the ledger's errors."""


class TransferError(LedgerError, ValueError):
    """A transfer that breaks a rule of the ledger; the message names the field and the rule."""


class AccountError(LedgerError, ValueError):
    """An account id that is not well formed."""


class BalanceInvariantError(LedgerError):
    """The sum of all balances is not zero after a batch: the books are broken and the service must stop.

    Deliberately not a ValueError: nothing a caller sent can cause it, only a
    defect or a damaged database, and no handler should treat it as bad input.
    """


def account_id(kind: AccountKind, name: str) -> str:
    """The id of an account: `<kind>:<name>`."""
    if not _ACCOUNT_NAME_RE.fullmatch(name):
        raise AccountError(f"account name {name!r} must match {ACCOUNT_NAME_PATTERN}")
    return f"{kind.value}:{name}"


def participant_account(participant_id: str) -> str:
    return account_id(AccountKind.PARTICIPANT, participant_id)


def account_kind(account_id_: str) -> AccountKind:
    """The kind of an account, read from its id; raises AccountError for a malformed id."""
    if not _ACCOUNT_ID_RE.fullmatch(account_id_):
        raise AccountError(f"account id {account_id_!r} must match {ACCOUNT_ID_PATTERN}")
    return AccountKind(account_id_.split(":", 1)[0])


class Transfer(NamedTuple):
    """One movement of money: `amount_nano` from `debit_account` to `credit_account`.

    A tuple, so that a batch of transfers is cheap to build and maps directly
    onto table rows. `transfer_id` is chosen by whoever creates the transfer
    (the settlement derives it from the interval, the rule and the parties) and
    is the idempotency key. `code` names the rule that produced it,
    `interval_start_s` the delivery interval it settles (0 for none),
    `linked_group` the id of the first transfer of its linked group (empty when
    it stands alone) and `flags` is a bit set of FLAG_*.
    """

    transfer_id: str
    debit_account: str
    credit_account: str
    amount_nano: int
    code: str
    interval_start_s: int = 0
    linked_group: str = ""
    flags: int = 0


def transfer_problem(transfer: Transfer) -> str | None:
    """What is wrong with a transfer on its own (field and rule), or None if nothing is."""
    tid = transfer.transfer_id
    if type(tid) is not str or not _TRANSFER_ID_RE.fullmatch(tid):
        return f"transfer_id {tid!r} must match {TRANSFER_ID_PATTERN}"
    for field in ("debit_account", "credit_account"):
        value = getattr(transfer, field)
        if type(value) is not str or not _ACCOUNT_ID_RE.fullmatch(value):
            return f"{field} {value!r} must match {ACCOUNT_ID_PATTERN}"
    if transfer.debit_account == transfer.credit_account:
        return f"debit_account and credit_account must differ, both are {transfer.debit_account!r}"
    amount = transfer.amount_nano
    if type(amount) is not int or not 1 <= amount <= MAX_AMOUNT_NANO:
        return f"amount_nano {amount!r} must be an integer from 1 to {MAX_AMOUNT_NANO}"
    if type(transfer.code) is not str or not _CODE_RE.fullmatch(transfer.code):
        return f"code {transfer.code!r} must match {CODE_PATTERN}"
    start = transfer.interval_start_s
    if type(start) is not int or not 0 <= start <= MAX_INTERVAL_START_S:
        return f"interval_start_s {start!r} must be an integer from 0 to {MAX_INTERVAL_START_S}"
    group = transfer.linked_group
    if type(group) is not str or (group and not _TRANSFER_ID_RE.fullmatch(group)):
        return f"linked_group {group!r} must be empty or match {TRANSFER_ID_PATTERN}"
    if type(transfer.flags) is not int or not 0 <= transfer.flags <= MAX_FLAGS:
        return f"flags {transfer.flags!r} must be an integer from 0 to {MAX_FLAGS}"
    return None


def check_transfer(transfer: Transfer) -> Transfer:
    """Return the transfer if it is well formed, else raise TransferError naming the field and rule."""
    problem = transfer_problem(transfer)
    if problem is not None:
        raise TransferError(f"transfer {transfer.transfer_id!r}: {problem}")
    return transfer


class Status(StrEnum):
    CREATED = "created"
    """Appended by this batch."""
    EXISTS = "exists"
    """The same transfer was stored before (or earlier in the batch): nothing changed."""
    REJECTED = "rejected"
    """Not applied; `reason` says why."""


@dataclass(frozen=True, slots=True)
class TransferResult:
    transfer_id: str
    status: Status
    reason: str = ""


@dataclass(slots=True)
class AccountTotals:
    """What an account has been debited and credited in total; its balance is credits − debits."""

    debits_nano: int = 0
    credits_nano: int = 0

    @property
    def balance_nano(self) -> int:
        return self.credits_nano - self.debits_nano


@dataclass(frozen=True, slots=True)
class BatchPlan:
    """What applying a batch does: results in input order, transfers to append, new account totals."""

    results: tuple[TransferResult, ...]
    appended: tuple[Transfer, ...]
    totals: dict[str, AccountTotals]
    """New totals of every account the appended transfers touch."""
    new_accounts: tuple[str, ...]
    """Accounts that did not exist before this batch, in first-use order."""


def _group_of(transfer: Transfer) -> str:
    """The transfer's linked group; a malformed one counts as none (the transfer is refused anyway)."""
    group = transfer.linked_group
    return group if isinstance(group, str) else ""


def _groups(transfers: Sequence[Transfer]) -> list[tuple[int, int]]:
    """Split a batch into [start, end) ranges: one per linked group, one per standalone transfer."""
    ranges = []
    i = 0
    n = len(transfers)
    while i < n:
        group = _group_of(transfers[i])
        j = i + 1
        if group:
            while j < n and transfers[j].linked_group == group:
                j += 1
        ranges.append((i, j))
        i = j
    return ranges


def plan_batch(
    transfers: Sequence[Transfer],
    existing: Mapping[str, Transfer],
    totals: Mapping[str, AccountTotals],
    *,
    checked: bool = False,
) -> BatchPlan:
    """Decide the effect of a batch, as if its groups were applied one after the other in order.

    `existing` holds the stored transfers whose ids occur in the batch (the
    others are new); `totals` the current totals of at least every account the
    batch touches (a missing account is new, with zero totals). `checked=True`
    skips the per-field checks for transfers built by trusted code that has
    already validated its inputs (the settlement), never for outside input.
    """
    results: list[TransferResult | None] = [None] * len(transfers)
    appended: list[Transfer] = []
    new_totals: dict[str, AccountTotals] = {}
    new_accounts: list[str] = []
    in_batch: dict[str, Transfer] = {}
    closed_groups: set[str] = set()

    def current(account: str) -> AccountTotals:
        found = new_totals.get(account)
        if found is None:
            base = totals.get(account)
            if base is None:
                new_accounts.append(account)
                found = AccountTotals()
            else:
                found = AccountTotals(base.debits_nano, base.credits_nano)
            new_totals[account] = found
        return found

    for start, end in _groups(transfers):
        members = transfers[start:end]
        group = _group_of(members[0])
        problems: dict[int, str] = {}
        repeats = 0
        if group:
            if group in closed_groups:
                problems[start] = f"linked group {group!r} appears twice in the batch; a group is consecutive"
            elif members[0].transfer_id != group:
                problems[start] = (
                    f"linked_group {group!r} must be the id of the group's first transfer "
                    f"{members[0].transfer_id!r}"
                )
            closed_groups.add(group)
        member_ids: set[str] = set()
        for offset, transfer in enumerate(members):
            index = start + offset
            if not checked:
                problem = transfer_problem(transfer)
                if problem is not None:
                    problems.setdefault(index, problem)
                    continue
            if transfer.transfer_id in member_ids:
                problems.setdefault(index, f"transfer id {transfer.transfer_id!r} occurs twice in its group")
                continue
            member_ids.add(transfer.transfer_id)
            earlier = in_batch.get(transfer.transfer_id)
            if earlier is None:
                earlier = existing.get(transfer.transfer_id)
            if earlier is not None:
                if earlier == transfer:
                    repeats += 1
                else:
                    problems.setdefault(
                        index, f"transfer id {transfer.transfer_id!r} exists with a different body"
                    )
        if not problems and repeats == len(members):
            for offset, transfer in enumerate(members):
                results[start + offset] = TransferResult(transfer.transfer_id, Status.EXISTS)
            continue
        if not problems and repeats:
            problems[start] = (
                f"linked group {group!r} partly exists ({repeats} of {len(members)} transfers); "
                "a group is applied all or nothing"
            )
        if not problems:
            # Totals are changed tentatively and restored if any member overflows.
            saved: dict[str, tuple[int, int]] = {}
            for transfer in members:
                for account in (transfer.debit_account, transfer.credit_account):
                    if account not in saved:
                        account_totals = current(account)
                        saved[account] = (account_totals.debits_nano, account_totals.credits_nano)
            for offset, transfer in enumerate(members):
                debit = new_totals[transfer.debit_account]
                credit = new_totals[transfer.credit_account]
                if debit.debits_nano + transfer.amount_nano > MAX_AMOUNT_NANO:
                    problems[start + offset] = (
                        f"debits of {transfer.debit_account} would exceed {MAX_AMOUNT_NANO} nano"
                    )
                    break
                if credit.credits_nano + transfer.amount_nano > MAX_AMOUNT_NANO:
                    problems[start + offset] = (
                        f"credits of {transfer.credit_account} would exceed {MAX_AMOUNT_NANO} nano"
                    )
                    break
                debit.debits_nano += transfer.amount_nano
                credit.credits_nano += transfer.amount_nano
            if problems:
                for account, (debits, credits) in saved.items():
                    new_totals[account].debits_nano = debits
                    new_totals[account].credits_nano = credits
        if problems:
            first = min(problems)
            for offset, transfer in enumerate(members):
                index = start + offset
                reason = problems.get(index) or (
                    f"linked transfer {transfers[first].transfer_id!r} was rejected: {problems[first]}"
                )
                results[index] = TransferResult(transfer.transfer_id, Status.REJECTED, reason)
            continue
        for offset, transfer in enumerate(members):
            results[start + offset] = TransferResult(transfer.transfer_id, Status.CREATED)
            in_batch[transfer.transfer_id] = transfer
            appended.append(transfer)

    touched = {a for t in appended for a in (t.debit_account, t.credit_account)}
    final_results = tuple(r for r in results if r is not None)
    assert len(final_results) == len(transfers)
    return BatchPlan(
        results=final_results,
        appended=tuple(appended),
        totals={a: t for a, t in new_totals.items() if a in touched},
        new_accounts=tuple(a for a in new_accounts if a in touched),
    )


# The same sums in compiled code, when services/ledger/_native.c was built.
_add_totals: Callable[[Sequence[Transfer], dict[str, int], dict[str, int]], None] | None = (
    None if native is None else native.add_totals
)


class GroupTotals:
    """What a linked group of trusted, new transfers debits and credits per account, added up chunk by chunk."""

    __slots__ = ("credited", "debited")

    def __init__(self) -> None:
        self.debited: dict[str, int] = {}
        self.credited: dict[str, int] = {}

    def add(self, transfers: Sequence[Transfer]) -> None:
        if _add_totals is not None:
            _add_totals(transfers, self.debited, self.credited)
            return
        debited = self.debited
        credited = self.credited
        debited_get = debited.get
        credited_get = credited.get
        for t in transfers:
            debit = t[1]
            credit = t[2]
            amount = t[3]
            debited[debit] = debited_get(debit, 0) + amount
            credited[credit] = credited_get(credit, 0) + amount

    def new_totals(
        self, totals: Mapping[str, AccountTotals]
    ) -> tuple[dict[str, AccountTotals], tuple[str, ...]]:
        """New totals of the accounts the group touches, and which of them are new (see `plan_new_group`)."""
        debited = self.debited
        credited = self.credited
        new_totals: dict[str, AccountTotals] = {}
        new_accounts: list[str] = []
        zero = AccountTotals()
        for account in dict.fromkeys(itertools.chain(debited, credited)):
            base = totals.get(account)
            if base is None:
                new_accounts.append(account)
                base = zero
            debits = base.debits_nano + debited.get(account, 0)
            credits = base.credits_nano + credited.get(account, 0)
            if debits > MAX_AMOUNT_NANO or credits > MAX_AMOUNT_NANO:
                raise TransferError(
                    f"totals of {account} would exceed {MAX_AMOUNT_NANO} nano; the group is rejected"
                )
            new_totals[account] = AccountTotals(debits, credits)
        return new_totals, tuple(new_accounts)


def plan_new_group(
    transfers: Sequence[Transfer], totals: Mapping[str, AccountTotals]
) -> tuple[dict[str, AccountTotals], tuple[str, ...]]:
    """New totals and new accounts for one linked group of trusted, new transfers (the settlement's path).

    Equivalent to `plan_batch(..., checked=True)` when no id exists yet, at a
    fraction of its cost. Amounts are positive, so the totals only grow and
    checking the final totals for overflow checks every intermediate one.
    Raises TransferError if an account would overflow: the group is then
    rejected as a whole.
    """
    group = GroupTotals()
    group.add(transfers)
    return group.new_totals(totals)


def check_balance_sum(totals: Iterable[tuple[int, int]], *, where: str) -> None:
    """Raise BalanceInvariantError unless Σ credits − Σ debits over all accounts is zero."""
    debits = 0
    credits = 0
    for debit_nano, credit_nano in totals:
        debits += debit_nano
        credits += credit_nano
    if debits != credits:
        raise BalanceInvariantError(
            f"{where}: the sum of all balances is {credits - debits} nano, not zero "
            f"(debits {debits}, credits {credits}); the ledger must stop"
        )
