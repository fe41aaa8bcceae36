"""What the ledger answers: outcomes of batches and settlements, balances, statements."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from services.domain.intervals import DEFAULT_INTERVAL_S
from services.ledger.domain.checkpoint import Checkpoint
from services.ledger.domain.ledger import Status, Transfer, TransferResult


@dataclass(frozen=True, slots=True)
class BatchOutcome:
    """The result of one batch: per transfer (input order) its result and its seq, and the new checkpoint."""

    results: tuple[TransferResult, ...]
    seqs: tuple[int | None, ...]
    """The seq of the created or earlier transfer; None for a rejected one."""
    appended: int
    checkpoint: Checkpoint | None
    """The checkpoint that ends the batch; None when nothing was appended."""

    @property
    def rejected(self) -> tuple[TransferResult, ...]:
        return tuple(r for r in self.results if r.status is Status.REJECTED)


class SettlementStatus(StrEnum):
    SETTLED = "settled"
    """First settlement of the interval (revision 0)."""
    CORRECTED = "corrected"
    """Better meter data arrived: a new revision booked the differences."""
    UNCHANGED = "unchanged"
    """Nothing new: the interval was settled on this data already, nothing was written."""


@dataclass(frozen=True, slots=True)
class SettlementOutcome:
    market_id: str
    interval_start_s: int
    revision: int
    """The interval's latest revision after this call."""
    status: SettlementStatus
    transfer_count: int
    """Transfers booked by this call (0 when unchanged)."""
    first_seq: int
    tree_size: int
    estimated_participants: tuple[str, ...]
    """Participants whose meter data is still estimated; their deviations may be corrected later."""
    checkpoint: Checkpoint | None
    interval_s: int = DEFAULT_INTERVAL_S
    """The length of the settled interval."""


@dataclass(frozen=True, slots=True)
class AccountBalance:
    account_id: str
    debits_nano: int
    credits_nano: int

    @property
    def balance_nano(self) -> int:
        """Credits − debits: positive means the ledger owes the account holder."""
        return self.credits_nano - self.debits_nano


@dataclass(frozen=True, slots=True)
class StoredTransfer:
    seq: int
    transfer: Transfer


@dataclass(frozen=True, slots=True)
class StatementLine:
    seq: int
    transfer: Transfer
    amount_nano: int
    """Signed for the account: positive when credited, negative when debited."""


@dataclass(frozen=True, slots=True)
class SettledRevision:
    market_id: str
    interval_start_s: int
    revision: int
    first_seq: int
    transfer_count: int
    tree_size: int
    estimated_count: int
    settled_at_ms: int
