"""Verification of a whole ledger from its stored rows: chain, Merkle tree, checkpoints and balances.

What is checked, in this order (the first failure raises `VerificationError`
naming the row and the check):

1. Checkpoints: each signature (with the trusted key when one is given),
   their `previous` chain, increasing sizes, one origin, time never going back.
2. For every transfer n = 1, 2, …: the transfer and chain rows both exist
   (none deleted or moved), the chain row names the same transfer, the entry
   hash of the re-encoded transfer, the chained hash, and at every checkpoint
   the chain head, the Merkle root and the stored frontier.
3. At the end: the last checkpoint covers the whole chain, every stored Merkle
   node equals the recomputed one and none is left over, every account's
   totals equal the sums of its transfers, balances sum to zero, and every
   settlement record agrees with the chain.

Step 2 is split into ranges of the chain (`RangeAuditor`) that can run in
separate processes: each range hashes its own part of the Merkle tree as a
compact range, and `LedgerAuditor.finish` joins the parts, so the roots are
the same as if one process had hashed everything.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.ledger.domain.chain import ENTRY_PREFIX, GENESIS_HASH, parse_entry
from services.ledger.domain.checkpoint import NO_PREVIOUS, Checkpoint, CheckpointError, verify_checkpoint
from services.ledger.domain.hashing import sha256
from services.ledger.domain.ledger import (
    AccountError,
    LedgerError,
    TransferError,
    account_kind,
    transfer_problem,
)
from services.ledger.domain.merkle import CompactRange


class VerificationError(LedgerError):
    """The ledger does not verify; the message names the first failed check."""


@dataclass(frozen=True, slots=True)
class AuditReport:
    transfers: int
    checkpoints: int
    accounts: int
    settled_intervals: int
    root_hash: bytes
    signed_by: tuple[bytes, ...]
    """The public keys the checkpoints are signed with (one, unless the key was rotated)."""


@dataclass(slots=True)
class RangeResult:
    """What one range of the chain, seqs (begin, end], contributes to the verification."""

    begin: int
    end: int
    """The last seq verified; less than planned if the range failed."""
    failure: tuple[int, str] | None
    pieces_at: dict[int, list[tuple[int, int, bytes]]]
    """For each checkpoint size in the range: the compact range (begin, size]."""
    pieces: list[tuple[int, int, bytes]]
    completed: list[tuple[int, int, bytes]]
    """Perfect subtrees of the stored levels completed inside the range."""
    debits: dict[str, int] = field(default_factory=dict)
    credits: dict[str, int] = field(default_factory=dict)
    intervals: bytes = b""
    """interval_start_s of each transfer of the range, as array('q') bytes."""


TransferRow = Sequence[Any]
"""(seq, transfer_id, debit_account, credit_account, amount_nano, code, interval_start_s, linked_group, flags)"""
ChainRow = Sequence[Any]
"""(seq, transfer_id, entry_hash, chained_hash)"""


class RangeAuditor:
    """Re-hashes the transfers with seqs (begin, end], fed in order, starting from the stored chained hash of `begin`."""

    def __init__(
        self,
        begin: int,
        end: int,
        start_head: bytes,
        heads_at: Mapping[int, bytes],
        node_min_level: int,
    ) -> None:
        self.begin = begin
        self.end = end
        self._seq = begin
        self._head = start_head
        self._heads_at = {s: h for s, h in heads_at.items() if begin < s <= end}
        self._node_min_level = node_min_level
        self._range = CompactRange(begin)
        self._pieces_at: dict[int, list[tuple[int, int, bytes]]] = {}
        self._completed: list[tuple[int, int, bytes]] = []
        self._debits: dict[str, int] = {}
        self._credits: dict[str, int] = {}
        self._intervals = array("q")
        self._failure: tuple[int, str] | None = None

    @property
    def verified(self) -> int:
        return self._seq

    @property
    def failed(self) -> bool:
        return self._failure is not None

    def feed(self, transfer_rows: Sequence[TransferRow], chain_rows: Sequence[ChainRow]) -> None:
        """Verify the next rows of both tables (same seq range, in order); after a failure the range stops."""
        if self._failure is not None:
            return
        if self._feed_intact(transfer_rows, chain_rows):
            return
        try:
            self._feed(transfer_rows, chain_rows)
        except VerificationError as e:
            self._failure = (self._seq + 1, str(e))

    def _feed_intact(self, transfer_rows: Sequence[TransferRow], chain_rows: Sequence[ChainRow]) -> bool:
        """Verify rows that are intact a column at a time; False (nothing taken) if any check fails.

        The same checks as `_feed`, which then runs on the same rows to name
        the first failure: whole columns compared at once cost less than a
        check per row, and a ledger nobody touched is the common case.
        """
        count = len(transfer_rows)
        if not count or len(chain_rows) != count:
            return False
        seq = self._seq
        if [t[0] for t in transfer_rows] != list(range(seq + 1, seq + count + 1)):
            return False
        if [c[0] for c in chain_rows] != list(range(seq + 1, seq + count + 1)):
            return False
        if [t[1] for t in transfer_rows] != [c[1] for c in chain_rows]:
            return False
        amounts = [t[4] for t in transfer_rows]
        intervals = [t[6] for t in transfer_rows]
        if set(map(type, amounts)) != {int} or set(map(type, intervals)) != {int}:
            return False
        sha = sha256
        prefix = f"\x00{ENTRY_PREFIX}|"
        try:
            leaves = [
                sha(
                    f"{prefix}{tid}|{debit}|{credit}|{amount}|{code}|{start}|{group}|{flags}".encode("ascii")
                ).digest()
                for _seq, tid, debit, credit, amount, code, start, group, flags in transfer_rows
            ]
        except (UnicodeEncodeError, ValueError):
            return False
        head = self._head
        heads: list[bytes] = []
        push = heads.append
        for h in leaves:
            head = sha(head + h).digest()
            push(head)
        try:
            if leaves != [bytes(c[2]) for c in chain_rows] or heads != [bytes(c[3]) for c in chain_rows]:
                return False
        except TypeError:  # a hash that is not bytes at all (NULL)
            return False
        for size, signed_head in self._heads_at.items():
            if seq < size <= seq + count and heads[size - seq - 1] != signed_head:
                return False
        debits = self._debits
        credits = self._credits
        debits_get = debits.get
        credits_get = credits.get
        for t in transfer_rows:
            debits[t[2]] = debits_get(t[2], 0) + t[4]
            credits[t[3]] = credits_get(t[3], 0) + t[4]
        self._intervals.extend(intervals)
        self._append_leaves(leaves)
        self._seq += count
        self._head = head
        return True

    def _feed(self, transfer_rows: Sequence[TransferRow], chain_rows: Sequence[ChainRow]) -> None:
        sha = sha256
        prefix = ENTRY_PREFIX
        seq = self._seq
        head = self._head
        debits = self._debits
        credits = self._credits
        intervals = self._intervals
        heads_at = self._heads_at
        leaves: list[bytes] = []
        leaf = leaves.append
        try:
            for t, c in zip(transfer_rows, chain_rows, strict=False):
                seq += 1
                if t[0] != seq:
                    raise VerificationError(
                        f"transfers: no row for seq {seq} (next is {t[0]}): a transfer was deleted or moved"
                    )
                if c[0] != seq:
                    raise VerificationError(
                        f"chain: no row for seq {seq} (next is {c[0]}): a chain row was deleted or moved"
                    )
                if c[1] != t[1]:
                    raise VerificationError(
                        f"seq {seq}: the chain row names transfer {c[1]!r}, the transfers row is {t[1]!r}: "
                        "one was changed"
                    )
                amount = t[4]
                if type(amount) is not int or type(t[6]) is not int:
                    raise VerificationError(
                        f"transfer seq {seq}: amount_nano or interval_start_s is not an integer"
                    )
                entry = f"{prefix}|{t[1]}|{t[2]}|{t[3]}|{amount}|{t[5]}|{t[6]}|{t[7]}|{t[8]}"
                try:
                    h = sha(b"\x00" + entry.encode("ascii")).digest()
                except UnicodeEncodeError:
                    raise VerificationError(
                        f"transfer seq {seq}: a field holds non-ASCII characters"
                    ) from None
                if h != c[2]:
                    _explain_entry_mismatch(seq, entry)
                head = sha(head + h).digest()
                if head != c[3]:
                    raise VerificationError(
                        f"chain seq {seq}: chained hash does not follow from the previous one and the entry hash"
                    )
                signed_head = heads_at.get(seq)
                if signed_head is not None and signed_head != head:
                    raise VerificationError(
                        f"checkpoint of size {seq}: the chain head differs from the signed one"
                    )
                leaf(h)
                debits[t[2]] = debits.get(t[2], 0) + amount
                credits[t[3]] = credits.get(t[3], 0) + amount
                intervals.append(t[6])
            if len(transfer_rows) != len(chain_rows):
                missing = "chain" if len(transfer_rows) > len(chain_rows) else "transfers"
                raise VerificationError(
                    f"{missing}: no row for seq {seq + 1}: a {'chain row' if missing == 'chain' else 'transfer'} "
                    "was deleted or moved"
                )
        finally:
            # Whatever verified before a failure still counts for the Merkle tree and checkpoints.
            self._append_leaves(leaves)
            self._seq += len(leaves)
        self._head = head

    def _append_leaves(self, leaves: list[bytes]) -> None:
        before = self._range.end
        done = 0
        for size in sorted(s for s in self._heads_at if before < s <= before + len(leaves)):
            offset = size - before
            self._range.extend(leaves[done:offset], self._node_min_level, self._completed)
            self._pieces_at[size] = self._range.pieces()
            done = offset
        self._range.extend(leaves[done:], self._node_min_level, self._completed)

    def result(self) -> RangeResult:
        if self._failure is None and self._seq != self.end:
            self._failure = (
                self._seq + 1,
                f"transfers: no row for seq {self._seq + 1}: transfers were deleted or the chain is shorter",
            )
        return RangeResult(
            begin=self.begin,
            end=self._range.end,
            failure=self._failure,
            pieces_at=self._pieces_at,
            pieces=self._range.pieces(),
            completed=self._completed,
            debits=self._debits,
            credits=self._credits,
            intervals=self._intervals.tobytes(),
        )


def _explain_entry_mismatch(seq: int, entry: str) -> None:
    problem: str | None
    try:
        problem = transfer_problem(parse_entry(entry))
    except TransferError as exc:
        problem = str(exc)
    detail = f" ({problem})" if problem else ""
    raise VerificationError(
        f"transfer seq {seq}: its entry hash does not match the chain{detail}: "
        "the transfer or its chain row was changed"
    )


class LedgerAuditor:
    """Checks the checkpoints up front, plans the ranges, and joins the ranges' results."""

    def __init__(
        self,
        checkpoints: Sequence[tuple[Checkpoint, bytes]],
        stored_nodes: Mapping[tuple[int, int], bytes],
        node_min_level: int,
        trusted_public_key: bytes | None = None,
    ) -> None:
        """`checkpoints`: (checkpoint, stored frontier) in increasing size; `stored_nodes`: (level, index) → hash."""
        self._checkpoints = list(checkpoints)
        self._nodes = dict(stored_nodes)
        self._node_min_level = node_min_level
        self._check_checkpoints(trusted_public_key)
        self.heads_at = {c.tree_size: c.chain_head for c, _f in self._checkpoints}

    @property
    def node_min_level(self) -> int:
        return self._node_min_level

    def _check_checkpoints(self, trusted: bytes | None) -> None:
        previous_hash = NO_PREVIOUS
        previous: Checkpoint | None = None
        for checkpoint, frontier in self._checkpoints:
            size = checkpoint.tree_size
            try:
                verify_checkpoint(checkpoint, trusted)
            except CheckpointError as exc:
                raise VerificationError(str(exc)) from exc
            if checkpoint.previous_hash != previous_hash:
                raise VerificationError(
                    f"checkpoint of size {size} does not name the checkpoint before it "
                    f"({'none' if previous is None else previous.tree_size}) as previous: one is missing or forged"
                )
            if previous is not None:
                if size <= previous.tree_size:
                    raise VerificationError(
                        f"checkpoint sizes do not increase: {previous.tree_size} then {size}"
                    )
                if checkpoint.origin != previous.origin:
                    raise VerificationError(
                        f"checkpoint of size {size} has origin {checkpoint.origin!r}, "
                        f"the ones before {previous.origin!r}"
                    )
                if checkpoint.time_ms < previous.time_ms:
                    raise VerificationError(f"checkpoint of size {size} is older than the one before it")
            if len(frontier) != 32 * size.bit_count():
                raise VerificationError(f"checkpoint of size {size}: stored frontier has the wrong length")
            previous_hash = checkpoint.checkpoint_hash()
            previous = checkpoint

    def plan(self, total: int, parts: int, min_range: int = 25_000) -> list[tuple[int, int]]:
        """Split seqs (0, total] into up to `parts` ranges of about equal length, none shorter than `min_range`."""
        parts = max(1, min(parts, total // max(1, min_range) or 1))
        bounds = [total * i // parts for i in range(parts + 1)]
        return [(bounds[i], bounds[i + 1]) for i in range(parts)]

    def range_auditor(self, begin: int, end: int, start_head: bytes | None) -> RangeAuditor:
        """An auditor for seqs (begin, end]; `start_head` is the stored chained hash of `begin` (None if absent)."""
        auditor = RangeAuditor(
            begin,
            end,
            GENESIS_HASH if begin == 0 else (start_head or b""),
            self.heads_at,
            self._node_min_level,
        )
        if begin and start_head is None:
            auditor._failure = (begin, f"chain: no row for seq {begin}: a chain row was deleted or moved")
        return auditor

    def finish(
        self,
        results: Sequence[RangeResult],
        chain_rows: int,
        accounts: Iterable[tuple[str, str, int, int]],
        settled: Iterable[tuple[str, int, int, int, int, int]],
    ) -> AuditReport:
        """Join the ranges (in order) and run the final checks; `accounts` rows are (id, kind, debits,
        credits), `settled` rows (market_id, interval_start_s, revision, first_seq, transfer_count, tree_size)."""
        whole = CompactRange(0)
        completed: list[tuple[int, int, bytes]] = []
        frontiers = {c.tree_size: (c, f) for c, f in self._checkpoints}
        for result in results:
            for size in sorted(result.pieces_at):
                checkpoint, frontier_bytes = frontiers[size]
                at = whole.copy()
                for piece in result.pieces_at[size]:
                    at.append_piece(*piece, 64, [])
                if at.root() != checkpoint.root_hash:
                    raise VerificationError(
                        f"checkpoint of size {size}: the Merkle root of the stored transfers differs from the signed "
                        "root: a covered transfer was changed, removed or reordered"
                    )
                if at.to_bytes() != frontier_bytes:
                    raise VerificationError(f"checkpoint of size {size}: the stored frontier was changed")
            if result.failure is not None:
                raise VerificationError(result.failure[1])
            completed.extend(result.completed)
            for piece in result.pieces:
                whole.append_piece(*piece, self._node_min_level, completed)
        size = whole.end
        if chain_rows != size:
            raise VerificationError(
                f"chain: {chain_rows} rows for {size} transfers: transfers were deleted or chain rows added"
            )
        last = self._checkpoints[-1][0] if self._checkpoints else None
        if last is not None and last.tree_size > size:
            raise VerificationError(
                f"checkpoint of size {last.tree_size} covers more transfers than the {size} stored: "
                "transfers were deleted"
            )
        covered = last.tree_size if last else 0
        if covered != size:
            raise VerificationError(
                f"{size - covered} transfer(s) after the last checkpoint (size {covered}): "
                "every batch ends with a checkpoint, so a checkpoint was deleted or transfers were added"
            )
        nodes = dict(self._nodes)
        for level, index, h in sorted(completed):
            stored = nodes.pop((level, index), None)
            if stored is None:
                raise VerificationError(f"merkle_nodes: node (level {level}, index {index}) is missing")
            if stored != h:
                raise VerificationError(f"merkle_nodes: node (level {level}, index {index}) was changed")
        if nodes:
            (level, index), _h = min(nodes.items())
            raise VerificationError(
                f"merkle_nodes: node (level {level}, index {index}) does not belong to the tree of {size} transfers"
            )
        debits: dict[str, int] = {}
        credits: dict[str, int] = {}
        intervals = array("q")
        for result in results:
            for account, amount in result.debits.items():
                debits[account] = debits.get(account, 0) + amount
            for account, amount in result.credits.items():
                credits[account] = credits.get(account, 0) + amount
            intervals.frombytes(result.intervals)
        account_count = _check_accounts(accounts, debits, credits)
        settled_count = _check_settled(settled, {c.tree_size for c, _f in self._checkpoints}, intervals, size)
        return AuditReport(
            transfers=size,
            checkpoints=len(self._checkpoints),
            accounts=account_count,
            settled_intervals=settled_count,
            root_hash=whole.root(),
            signed_by=tuple(dict.fromkeys(c.public_key for c, _f in self._checkpoints)),
        )


def _check_accounts(
    accounts: Iterable[tuple[str, str, int, int]], debits: Mapping[str, int], credits: Mapping[str, int]
) -> int:
    expected = set(debits) | set(credits)
    seen: set[str] = set()
    debit_sum = 0
    credit_sum = 0
    for account, kind, account_debits, account_credits in accounts:
        try:
            real_kind = account_kind(account)
        except AccountError as exc:
            raise VerificationError(f"accounts: {exc}") from None
        if kind != real_kind.value:
            raise VerificationError(
                f"accounts: {account!r} has kind {kind!r}, its id says {real_kind.value!r}"
            )
        want_debits = debits.get(account, 0)
        want_credits = credits.get(account, 0)
        if account_debits != want_debits or account_credits != want_credits:
            raise VerificationError(
                f"accounts: {account!r} has debits {account_debits} / credits {account_credits} nano, "
                f"its transfers sum to {want_debits} / {want_credits}"
            )
        seen.add(account)
        debit_sum += account_debits
        credit_sum += account_credits
    missing = expected - seen
    if missing:
        raise VerificationError(f"accounts: {min(missing)!r} is used by transfers but has no account row")
    if debit_sum != credit_sum:
        raise VerificationError(f"accounts: balances sum to {credit_sum - debit_sum} nano, not zero")
    return len(seen)


def _check_settled(
    settled: Iterable[tuple[str, int, int, int, int, int]], sizes: set[int], intervals: array[int], size: int
) -> int:
    revisions: dict[tuple[str, int], int] = {}
    count = 0
    for market_id, interval_start_s, revision, first_seq, transfer_count, tree_size in sorted(settled):
        where = f"settled_intervals: {market_id} {interval_start_s} revision {revision}"
        expected_revision = revisions.get((market_id, interval_start_s), -1) + 1
        if revision != expected_revision:
            raise VerificationError(f"{where}: expected revision {expected_revision}")
        revisions[(market_id, interval_start_s)] = revision
        if transfer_count:
            if first_seq < 1 or first_seq + transfer_count - 1 != tree_size or tree_size not in sizes:
                raise VerificationError(f"{where}: its transfers do not end at a checkpoint")
            wrong = [s for s in range(first_seq, tree_size + 1) if intervals[s - 1] != interval_start_s]
            if wrong:
                raise VerificationError(f"{where}: transfer seq {wrong[0]} belongs to another interval")
        elif tree_size > size:
            raise VerificationError(f"{where}: refers to size {tree_size} beyond the chain")
        count += 1
    return count
