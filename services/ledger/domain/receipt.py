"""Receipts: a transfer, its inclusion proof and a signed checkpoint, verifiable offline with the ledger's public key.

The JSON form is documented in services/ledger/FORMATS.md. `verify_receipt`
needs nothing but the receipt and the ledger's public key: it re-encodes the
transfer, hashes it as an RFC 9162 leaf, walks the inclusion proof up to the
checkpoint's root and checks the checkpoint's Ed25519 signature.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from services.ledger.domain.chain import entry_bytes, parse_entry
from services.ledger.domain.checkpoint import Checkpoint, CheckpointError, verify_checkpoint
from services.ledger.domain.ledger import Transfer, TransferError, transfer_problem
from services.ledger.domain.merkle import ProofError, leaf_hash, verify_inclusion

RECEIPT_FORMAT = "p2pgrid-ledger-receipt-v1"


class ReceiptError(ValueError):
    """A receipt that does not prove what it claims; the message names the first failed check."""


@dataclass(frozen=True, slots=True)
class Receipt:
    seq: int
    transfer: Transfer
    inclusion_proof: tuple[bytes, ...]
    checkpoint: Checkpoint

    @property
    def leaf_index(self) -> int:
        return self.seq - 1

    def to_json(self) -> dict[str, Any]:
        t = self.transfer
        return {
            "format": RECEIPT_FORMAT,
            "seq": self.seq,
            "leaf_index": self.leaf_index,
            "entry": entry_bytes(t).decode("ascii"),
            "transfer": {
                "transfer_id": t.transfer_id,
                "debit_account": t.debit_account,
                "credit_account": t.credit_account,
                "amount_nano": str(t.amount_nano),
                "code": t.code,
                "interval_start_s": t.interval_start_s,
                "linked_group": t.linked_group,
                "flags": t.flags,
            },
            "inclusion_proof": [h.hex() for h in self.inclusion_proof],
            "checkpoint": self.checkpoint.to_json(),
        }

    @classmethod
    def from_json(cls, data: Any) -> Receipt:
        """Parse a receipt; the entry is authoritative and the `transfer` object must repeat it exactly."""
        if not isinstance(data, Mapping):
            raise ReceiptError("a receipt is a JSON object")
        if data.get("format") != RECEIPT_FORMAT:
            raise ReceiptError(f"format must be {RECEIPT_FORMAT!r}, got {data.get('format')!r}")
        seq = data.get("seq")
        if type(seq) is not int or seq < 1:
            raise ReceiptError(f"seq must be a positive integer, got {seq!r}")
        if data.get("leaf_index") != seq - 1:
            raise ReceiptError(f"leaf_index must be seq − 1 = {seq - 1}, got {data.get('leaf_index')!r}")
        entry = data.get("entry")
        if not isinstance(entry, str):
            raise ReceiptError("entry must be a string")
        try:
            transfer = parse_entry(entry)
        except TransferError as exc:
            raise ReceiptError(f"entry: {exc}") from exc
        problem = transfer_problem(transfer)
        if problem is not None:
            raise ReceiptError(f"entry: {problem}")
        shown = data.get("transfer")
        if not isinstance(shown, Mapping):
            raise ReceiptError("transfer must be a JSON object")
        expected = {
            "transfer_id": transfer.transfer_id,
            "debit_account": transfer.debit_account,
            "credit_account": transfer.credit_account,
            "amount_nano": str(transfer.amount_nano),
            "code": transfer.code,
            "interval_start_s": transfer.interval_start_s,
            "linked_group": transfer.linked_group,
            "flags": transfer.flags,
        }
        for field, value in expected.items():
            if shown.get(field) != value:
                raise ReceiptError(f"transfer.{field} is {shown.get(field)!r} but the entry says {value!r}")
        proof = data.get("inclusion_proof")
        if not isinstance(proof, list):
            raise ReceiptError("inclusion_proof must be a list of hex strings")
        hashes = []
        for i, item in enumerate(proof):
            if not isinstance(item, str) or not re.fullmatch(r"[0-9a-f]{64}", item):
                raise ReceiptError(f"inclusion_proof[{i}] must be 64 lower-case hex digits")
            hashes.append(bytes.fromhex(item))
        try:
            checkpoint = Checkpoint.from_json(data.get("checkpoint"))  # type: ignore[arg-type]
        except CheckpointError as exc:
            raise ReceiptError(str(exc)) from exc
        return cls(seq=seq, transfer=transfer, inclusion_proof=tuple(hashes), checkpoint=checkpoint)


def verify_receipt(receipt: Receipt, trusted_public_key: bytes) -> None:
    """Raise ReceiptError unless the checkpoint is signed by the trusted key and includes the transfer."""
    checkpoint = receipt.checkpoint
    try:
        verify_checkpoint(checkpoint, trusted_public_key)
    except CheckpointError as exc:
        raise ReceiptError(str(exc)) from exc
    if receipt.seq > checkpoint.tree_size:
        raise ReceiptError(f"seq {receipt.seq} is beyond the checkpoint's tree size {checkpoint.tree_size}")
    try:
        verify_inclusion(
            receipt.leaf_index,
            checkpoint.tree_size,
            leaf_hash(entry_bytes(receipt.transfer)),
            receipt.inclusion_proof,
            checkpoint.root_hash,
        )
    except ProofError as exc:
        raise ReceiptError(f"transfer {receipt.transfer.transfer_id!r}: {exc}") from exc
