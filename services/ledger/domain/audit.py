"""Verification of a whole ledger from its stored rows: chain, Merkle tree, checkpoints and balances.

`LedgerAuditor` is fed the stored rows in sequence order and recomputes
everything the ledger guarantees; the first difference raises
`VerificationError` with a message that names the row and the check. What it
checks, in this order:

1. Checkpoints: each signature (with the trusted key when one is given),
   their `previous` chain, increasing sizes, one origin, time never going back.
2. For every transfer n = 1, 2, …: the transfer and chain rows both exist
   (none deleted or reordered), the entry hash of the re-encoded transfer,
   the chained hash, and at every checkpoint the Merkle root, the chain head
   and the stored frontier; every stored Merkle node equals the recomputed one.
3. At the end: the last checkpoint covers the whole chain, no stored node or
   checkpoint is left unexplained, every account's stored totals equal the
   sums of its transfers, balances sum to zero, and every settled interval's
   record agrees with the chain.
"""

from __future__ import annotations

import hashlib
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from services.ledger.domain.chain import GENESIS_HASH, parse_entry
from services.ledger.domain.checkpoint import (
    NO_PREVIOUS,
    Checkpoint,
    CheckpointError,
    verify_checkpoint,
)
from services.ledger.domain.ledger import (
    AccountError,
    LedgerError,
    TransferError,
    account_kind,
    transfer_problem,
)
from services.ledger.domain.merkle import MerkleFrontier


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


class LedgerAuditor:
    def __init__(
        self,
        checkpoints: Sequence[tuple[Checkpoint, bytes]],
        stored_nodes: Mapping[tuple[int, int], bytes],
        node_min_level: int,
        trusted_public_key: bytes | None = None,
    ) -> None:
        """`checkpoints`: (checkpoint, stored frontier) in increasing size; `stored_nodes`: (level, index) → hash."""
        self._checkpoints = list(checkpoints)
        self._check_checkpoints(trusted_public_key)
        self._next_checkpoint = 0
        self._nodes = dict(stored_nodes)
        self._node_min_level = node_min_level
        self._seq = 0
        self._head = GENESIS_HASH
        self._frontier = MerkleFrontier()
        self._debits: dict[str, int] = {}
        self._credits: dict[str, int] = {}
        self._intervals = array("q")
        self._heads_at = {c.tree_size: c.chain_head for c, _f in self._checkpoints}

    @property
    def verified_transfers(self) -> int:
        return self._seq

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

    def feed(self, rows: Sequence[Sequence[Any]]) -> None:
        """Verify the next rows, in sequence order, starting right after the last fed seq.

        A row joins a transfer with the chain row of the same seq:
        (transfers.seq, chain.seq, debit_account, credit_account, amount_nano,
        interval_start_s, entry, chain.transfer_id = transfers.transfer_id,
        entry_hash, chained_hash), where `entry` is the canonical encoding of
        the stored fields, built by the database so that a row costs few
        Python objects. Whatever builds it, a stored field that differs from
        what was hashed gives a different entry.
        """
        sha = hashlib.sha256
        seq = self._seq
        head = self._head
        debits = self._debits
        credits = self._credits
        intervals = self._intervals
        heads_at = self._heads_at
        leaves: list[bytes] = []
        leaf = leaves.append
        for r in rows:
            seq += 1
            if r[0] != seq:
                raise VerificationError(
                    f"transfers: no row for seq {seq} (next is {r[0]}): a transfer was deleted or moved"
                )
            if r[1] != seq:
                raise VerificationError(f"chain: no row for seq {seq}: a chain row was deleted or moved")
            if not r[7]:
                raise VerificationError(
                    f"seq {seq}: the chain row names another transfer id than the transfers row: one was changed"
                )
            entry = r[6]
            try:
                h = sha(b"\x00" + entry.encode("ascii")).digest()
            except (AttributeError, UnicodeEncodeError):
                raise VerificationError(
                    f"transfer seq {seq}: a field is empty or holds non-ASCII characters"
                ) from None
            if h != r[8]:
                self._explain_entry_mismatch(seq, entry)
            head = sha(head + h).digest()
            if head != r[9]:
                raise VerificationError(
                    f"chain seq {seq}: chained hash does not follow from the previous one and the entry hash"
                )
            signed_head = heads_at.get(seq)
            if signed_head is not None and signed_head != head:
                raise VerificationError(
                    f"checkpoint of size {seq}: the chain head differs from the signed one"
                )
            leaf(h)
            amount = r[4]
            if type(amount) is not int or type(r[5]) is not int:
                raise VerificationError(
                    f"transfer seq {seq}: amount_nano or interval_start_s is not an integer"
                )
            debits[r[2]] = debits.get(r[2], 0) + amount
            credits[r[3]] = credits.get(r[3], 0) + amount
            intervals.append(r[5])
        self._append_leaves(self._seq, leaves)
        self._seq = seq
        self._head = head

    def _explain_entry_mismatch(self, seq: int, entry: str) -> None:
        problem: str | None
        try:
            transfer = parse_entry(entry)
            problem = transfer_problem(transfer)
        except TransferError as exc:
            problem = str(exc)
        detail = f" ({problem})" if problem else ""
        raise VerificationError(
            f"transfer seq {seq}: its entry hash does not match the chain{detail}: "
            "the transfer or its chain row was changed"
        )

    def _append_leaves(self, first_seq_before: int, leaves: list[bytes]) -> None:
        done = 0
        total = len(leaves)
        while done < total:
            end = total
            checkpoint: Checkpoint | None = None
            frontier_bytes = b""
            if self._next_checkpoint < len(self._checkpoints):
                checkpoint, frontier_bytes = self._checkpoints[self._next_checkpoint]
                offset = checkpoint.tree_size - first_seq_before
                if offset <= total:
                    end = offset
                else:
                    checkpoint = None
            completed: list[tuple[int, int, bytes]] = []
            self._frontier.extend(leaves[done:end], self._node_min_level, completed)
            nodes = self._nodes
            for level, index, h in completed:
                stored = nodes.pop((level, index), None)
                if stored is None:
                    raise VerificationError(f"merkle_nodes: node (level {level}, index {index}) is missing")
                if stored != h:
                    raise VerificationError(f"merkle_nodes: node (level {level}, index {index}) was changed")
            if checkpoint is not None:
                self._check_at_checkpoint(checkpoint, frontier_bytes)
                self._next_checkpoint += 1
            done = end

    def _check_at_checkpoint(self, checkpoint: Checkpoint, frontier_bytes: bytes) -> None:
        size = checkpoint.tree_size
        if self._frontier.root() != checkpoint.root_hash:
            raise VerificationError(
                f"checkpoint of size {size}: the Merkle root of the stored transfers differs from the signed "
                "root: a covered transfer was changed, removed or reordered"
            )
        if self._frontier.to_bytes() != frontier_bytes:
            raise VerificationError(f"checkpoint of size {size}: the stored frontier was changed")

    def finish(
        self,
        chain_rows: int,
        accounts: Iterable[tuple[str, str, int, int]],
        settled: Iterable[tuple[str, int, int, int, int, int]],
    ) -> AuditReport:
        """Final checks; `accounts` rows are (id, kind, debits, credits), `settled` rows
        (market_id, interval_start_s, revision, first_seq, transfer_count, tree_size)."""
        size = self._seq
        if chain_rows != size:
            raise VerificationError(
                f"chain: {chain_rows} rows for {size} transfers: transfers were deleted or chain rows added"
            )
        if self._next_checkpoint < len(self._checkpoints):
            orphan = self._checkpoints[self._next_checkpoint][0]
            raise VerificationError(
                f"checkpoint of size {orphan.tree_size} covers more transfers than the {size} stored: "
                "transfers were deleted"
            )
        last = self._checkpoints[-1][0] if self._checkpoints else None
        covered = last.tree_size if last else 0
        if covered != size:
            raise VerificationError(
                f"{size - covered} transfer(s) after the last checkpoint (size {covered}): "
                "every batch ends with a checkpoint, so a checkpoint was deleted or transfers were added"
            )
        if self._nodes:
            (level, index), _h = min(self._nodes.items())
            raise VerificationError(
                f"merkle_nodes: node (level {level}, index {index}) does not belong to the tree of {size} transfers"
            )
        account_count = self._check_accounts(accounts)
        settled_count = self._check_settled(settled)
        return AuditReport(
            transfers=size,
            checkpoints=len(self._checkpoints),
            accounts=account_count,
            settled_intervals=settled_count,
            root_hash=self._frontier.root(),
            signed_by=tuple(dict.fromkeys(c.public_key for c, _f in self._checkpoints)),
        )

    def _check_accounts(self, accounts: Iterable[tuple[str, str, int, int]]) -> int:
        expected = set(self._debits) | set(self._credits)
        seen: set[str] = set()
        debit_sum = 0
        credit_sum = 0
        for account, kind, debits, credits in accounts:
            try:
                real_kind = account_kind(account)
            except AccountError as exc:
                raise VerificationError(f"accounts: {exc}") from None
            if kind != real_kind.value:
                raise VerificationError(
                    f"accounts: {account!r} has kind {kind!r}, its id says {real_kind.value!r}"
                )
            want_debits = self._debits.get(account, 0)
            want_credits = self._credits.get(account, 0)
            if debits != want_debits or credits != want_credits:
                raise VerificationError(
                    f"accounts: {account!r} has debits {debits} / credits {credits} nano, "
                    f"its transfers sum to {want_debits} / {want_credits}"
                )
            seen.add(account)
            debit_sum += debits
            credit_sum += credits
        missing = expected - seen
        if missing:
            raise VerificationError(f"accounts: {min(missing)!r} is used by transfers but has no account row")
        if debit_sum != credit_sum:
            raise VerificationError(f"accounts: balances sum to {credit_sum - debit_sum} nano, not zero")
        return len(seen)

    def _check_settled(self, settled: Iterable[tuple[str, int, int, int, int, int]]) -> int:
        sizes = {c.tree_size for c, _f in self._checkpoints}
        revisions: dict[tuple[str, int], int] = {}
        count = 0
        for market_id, interval_start_s, revision, first_seq, transfer_count, tree_size in sorted(settled):
            where = f"settled_intervals: {market_id} {interval_start_s} revision {revision}"
            expected_revision = revisions.get((market_id, interval_start_s), -1) + 1
            if revision != expected_revision:
                raise VerificationError(f"{where}: expected revision {expected_revision}")
            revisions[(market_id, interval_start_s)] = revision
            if transfer_count:
                if first_seq + transfer_count - 1 != tree_size or tree_size not in sizes:
                    raise VerificationError(f"{where}: its transfers do not end at a checkpoint")
                wrong = [
                    s for s in range(first_seq, tree_size + 1) if self._intervals[s - 1] != interval_start_s
                ]
                if wrong:
                    raise VerificationError(f"{where}: transfer seq {wrong[0]} belongs to another interval")
            elif tree_size > self._seq:
                raise VerificationError(f"{where}: refers to size {tree_size} beyond the chain")
            count += 1
        return count
