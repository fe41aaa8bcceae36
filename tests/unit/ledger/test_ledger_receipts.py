"""Checkpoints and receipts verify offline with the ledger's public key, and any change to them is caught."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from nacl.signing import SigningKey

from services.ledger.domain.chain import entry_bytes
from services.ledger.domain.checkpoint import (
    NO_PREVIOUS,
    Checkpoint,
    CheckpointError,
    sign_checkpoint,
    verify_checkpoint,
)
from services.ledger.domain.ledger import Transfer
from services.ledger.domain.merkle import MerkleFrontier, inclusion_proof, leaf_hash, root_of
from services.ledger.domain.receipt import Receipt, ReceiptError, verify_receipt

KEY = SigningKey(bytes(range(32)))
OTHER_KEY = SigningKey(bytes(range(1, 33)))


def ledger(n: int) -> tuple[list[Transfer], list[bytes], Checkpoint]:
    transfers = [
        Transfer(
            f"t{i}", "participant:alice", "market:demo", 1000 + i, "trade.purchase", 1_748_736_000, "", 0
        )
        for i in range(n)
    ]
    leaves = [leaf_hash(entry_bytes(t)) for t in transfers]
    frontier = MerkleFrontier()
    frontier.extend(leaves, 64, [])
    checkpoint = sign_checkpoint(
        KEY,
        origin="p2pgrid-ledger",
        tree_size=n,
        root_hash=frontier.root(),
        chain_head=b"\x07" * 32,
        time_ms=1_748_737_800_000,
        previous_hash=NO_PREVIOUS,
    )
    return transfers, leaves, checkpoint


def receipt_json(index: int, n: int = 37) -> dict[str, Any]:
    transfers, leaves, checkpoint = ledger(n)

    def perfect(level: int, i: int) -> bytes:
        return root_of(leaves[i << level : (i + 1) << level])

    proof = inclusion_proof(index, n, perfect)
    return Receipt(
        seq=index + 1, transfer=transfers[index], inclusion_proof=tuple(proof), checkpoint=checkpoint
    ).to_json()


def test_a_receipt_survives_json_and_verifies_offline() -> None:
    for index in (0, 17, 36):
        data = json.loads(json.dumps(receipt_json(index)))
        receipt = Receipt.from_json(data)
        verify_receipt(receipt, bytes(KEY.verify_key))
        assert receipt.transfer.transfer_id == f"t{index}"


def test_a_receipt_does_not_verify_with_another_key() -> None:
    receipt = Receipt.from_json(receipt_json(3))
    with pytest.raises(ReceiptError, match="not by the trusted ledger key"):
        verify_receipt(receipt, bytes(OTHER_KEY.verify_key))


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (
            ("entry",),
            "p2pgrid-transfer-v1|t3|participant:alice|market:demo|1004|trade.purchase|1748736000||0",
        ),
        (("transfer", "amount_nano"), "1004"),
        (("transfer", "credit_account"), "market:other"),
        (("seq",), 5),
        (("leaf_index",), 5),
        (("inclusion_proof", 0), "00" * 32),
        (("checkpoint", "tree_size"), 38),
        (("checkpoint", "root_hash"), "11" * 32),
        (("checkpoint", "time_ms"), 1),
        (("checkpoint", "origin"), "another-ledger"),
        (("checkpoint", "previous"), "22" * 32),
        (("checkpoint", "signature"), "33" * 64),
        (("checkpoint", "format"), "p2pgrid-ledger-checkpoint-v2"),
        (("format",), "p2pgrid-ledger-receipt-v0"),
    ],
)
def test_any_change_to_a_receipt_is_detected(path: tuple[Any, ...], value: Any) -> None:
    data = copy.deepcopy(receipt_json(3))
    target = data
    for key in path[:-1]:
        target = target[key]
    assert target[path[-1]] != value
    target[path[-1]] = value
    with pytest.raises(ReceiptError):
        verify_receipt(Receipt.from_json(data), bytes(KEY.verify_key))


def test_a_checkpoint_signature_covers_every_signed_field() -> None:
    _transfers, _leaves, checkpoint = ledger(5)
    verify_checkpoint(checkpoint, bytes(KEY.verify_key))
    assert checkpoint.signed_bytes().decode().splitlines() == [
        "p2pgrid-ledger-checkpoint-v1",
        "origin p2pgrid-ledger",
        "tree_size 5",
        f"root_hash {checkpoint.root_hash.hex()}",
        f"chain_head {'07' * 32}",
        "time_ms 1748737800000",
        f"previous {'00' * 32}",
    ]
    for field, value in [
        ("tree_size", 6),
        ("root_hash", b"\x01" * 32),
        ("chain_head", b"\x02" * 32),
        ("time_ms", 5),
        ("previous_hash", b"\x03" * 32),
        ("origin", "x"),
    ]:
        data = checkpoint.to_json()
        key = "previous" if field == "previous_hash" else field
        data[key] = value.hex() if isinstance(value, bytes) else value
        with pytest.raises(CheckpointError):
            verify_checkpoint(Checkpoint.from_json(data))
    assert Checkpoint.from_json(checkpoint.to_json()) == checkpoint
