"""The Ledger gRPC servicer: whose account a call may read, then one store query, converted to messages.

The acting participant comes only from the authenticated identity. A
participant reads its own account (`participant:<its id>`) and receipts for
transfers to or from it; naming another account or transfer answers
NOT_FOUND with the same message as one that does not exist, so a caller
learns nothing about others. Operators may name any account and call Verify.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from services.domain.errors import FailedPrecondition, InvalidArgument, NotFound, PermissionDenied
from services.gen.p2pgrid.ledger.v1 import ledger_pb2 as pb
from services.gen.p2pgrid.ledger.v1 import ledger_pb2_grpc as pb_grpc
from services.ledger.adapters.sql import AccountNotFoundError, LedgerStore, TransferNotFoundError
from services.ledger.domain.audit import VerificationError
from services.ledger.domain.checkpoint import Checkpoint
from services.ledger.domain.ledger import AccountError, account_kind, participant_account
from services.ledger.domain.merkle import ProofError
from services.ledger.domain.outcomes import StoredTransfer
from services.platform.grpc_server import Identity, current_identity

log = logging.getLogger(__name__)

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Ledger"].full_name
DEFAULT_LIMIT = 1000
MAX_LIMIT = 10_000
_NO_UPPER_BOUND_S = 2**63 - 1


def _readable_account(identity: Identity, requested: str) -> tuple[str, bool]:
    """The account a call reads and whether it is the caller's own; NOT_FOUND for another's."""
    own = participant_account(identity.participant_id)
    if not requested or requested == own:
        return own, True
    if not identity.operator:
        raise NotFound(f"no account {requested!r}", field="account_id")
    try:
        account_kind(requested)
    except AccountError as exc:
        raise InvalidArgument(str(exc), field="account_id") from None
    return requested, False


def _limit(value: int, field: str) -> int:
    if value == 0:
        return DEFAULT_LIMIT
    if value > MAX_LIMIT:
        raise InvalidArgument(f"must be at most {MAX_LIMIT}", field=field)
    return value


def transfer_message(stored: StoredTransfer) -> pb.Transfer:
    t = stored.transfer
    return pb.Transfer(
        transfer_id=t.transfer_id,
        debit_account_id=t.debit_account,
        credit_account_id=t.credit_account,
        amount_nano=t.amount_nano,
        kind=t.code,
        interval_start_s=t.interval_start_s,
        linked_id=t.linked_group,
        chain_seq=stored.seq,
        flags=t.flags,
    )


def checkpoint_message(c: Checkpoint) -> pb.Checkpoint:
    return pb.Checkpoint(
        tree_size=c.tree_size,
        root_hash=c.root_hash,
        time_s=c.time_ms // 1000,
        signature=c.signature,
        public_key=c.public_key,
        origin=c.origin,
        chain_head=c.chain_head,
        time_ms=c.time_ms,
        previous_hash=c.previous_hash,
    )


class LedgerServicer(pb_grpc.LedgerServicer):
    """Reads run on worker threads; none of them writes."""

    def __init__(self, store: LedgerStore) -> None:
        self.store = store

    async def GetBalance(self, request: pb.GetBalanceRequest, context: Any) -> pb.Balance:
        account, own = _readable_account(current_identity(), request.account_id)
        try:
            balance = await asyncio.to_thread(self.store.balance, account)
        except AccountNotFoundError:
            if own:  # nothing settled for the caller yet
                return pb.Balance(account_id=account)
            raise NotFound(f"no account {account!r}", field="account_id") from None
        return pb.Balance(
            account_id=account,
            balance_nano=balance.balance_nano,
            debits_nano=balance.debits_nano,
            credits_nano=balance.credits_nano,
        )

    async def GetStatement(self, request: pb.GetStatementRequest, context: Any) -> pb.Statement:
        account, own = _readable_account(current_identity(), request.account_id)
        limit = _limit(request.limit, "limit")
        to_s = request.to_interval_start_s or _NO_UPPER_BOUND_S
        if to_s < request.from_interval_start_s:
            raise InvalidArgument("must not be before from_interval_start_s", field="to_interval_start_s")
        try:
            balance = await asyncio.to_thread(self.store.balance, account)
            balance_nano = balance.balance_nano
        except AccountNotFoundError:
            if not own:
                raise NotFound(f"no account {account!r}", field="account_id") from None
            balance_nano = 0
        lines = await asyncio.to_thread(
            self.store.statement,
            account,
            from_interval_start_s=request.from_interval_start_s,
            to_interval_start_s=to_s,
            after_seq=request.after_seq,
            limit=limit,
        )
        statement = pb.Statement(account_id=account, balance_nano=balance_nano)
        statement.transfers.extend(
            transfer_message(StoredTransfer(line.seq, line.transfer)) for line in lines
        )
        if len(lines) == limit:
            statement.next_after_seq = lines[-1].seq
        return statement

    async def GetReceipt(self, request: pb.GetReceiptRequest, context: Any) -> pb.Receipt:
        identity = current_identity()
        if not request.transfer_id:
            raise InvalidArgument("is required", field="transfer_id")
        not_found = NotFound(f"no transfer {request.transfer_id!r}", field="transfer_id")
        try:
            stored = await asyncio.to_thread(self.store.transfer, request.transfer_id)
        except TransferNotFoundError:
            raise not_found from None
        own = participant_account(identity.participant_id)
        if not identity.operator and own not in (
            stored.transfer.debit_account,
            stored.transfer.credit_account,
        ):
            raise not_found
        try:
            receipt = await asyncio.to_thread(
                self.store.receipt, request.transfer_id, tree_size=request.tree_size or None
            )
        except TransferNotFoundError:
            raise not_found from None
        except LookupError as exc:
            raise FailedPrecondition(str(exc), field="tree_size") from None
        return pb.Receipt(
            receipt_json=json.dumps(receipt.to_json(), separators=(",", ":")),
            chain_seq=receipt.seq,
            tree_size=receipt.checkpoint.tree_size,
        )

    async def ListCheckpoints(
        self, request: pb.ListCheckpointsRequest, context: Any
    ) -> pb.ListCheckpointsResponse:
        current_identity()
        limit = _limit(request.limit, "limit")
        checkpoints = await asyncio.to_thread(
            self.store.checkpoints, after_size=request.after_tree_size, limit=limit
        )
        response = pb.ListCheckpointsResponse()
        response.checkpoints.extend(checkpoint_message(c) for c in checkpoints)
        return response

    async def GetConsistencyProof(
        self, request: pb.GetConsistencyProofRequest, context: Any
    ) -> pb.ConsistencyProof:
        current_identity()
        new_size = request.new_size
        if new_size == 0:
            latest = await asyncio.to_thread(self.store.latest_checkpoint)
            if latest is None:
                raise FailedPrecondition("the ledger has no checkpoint yet", field="new_size")
            new_size = latest.tree_size
        if request.old_size == 0 or request.old_size > new_size:
            raise InvalidArgument(f"must be from 1 to new_size ({new_size})", field="old_size")
        try:
            hashes = await asyncio.to_thread(self.store.consistency_proof, request.old_size, new_size)
        except ProofError as exc:
            raise InvalidArgument(str(exc), field="new_size") from None
        return pb.ConsistencyProof(old_size=request.old_size, new_size=new_size, hashes=hashes)

    async def Verify(self, request: pb.VerifyRequest, context: Any) -> pb.VerifyResponse:
        identity = current_identity()
        if not identity.operator:
            raise PermissionDenied("only operators may verify the whole ledger")
        try:
            report = await asyncio.to_thread(self.store.verify, trusted_public_key=self.store.public_key)
        except VerificationError as exc:
            log.error("the ledger does not verify", extra={"error": str(exc)})
            return pb.VerifyResponse(ok=False, first_failure=str(exc))
        return pb.VerifyResponse(
            ok=True,
            transfers_checked=report.transfers,
            checkpoints_checked=report.checkpoints,
            root_hash=report.root_hash,
        )
