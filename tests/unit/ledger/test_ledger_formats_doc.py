"""The example receipt in services/ledger/FORMATS.md is real: it verifies, and its parts follow the spec."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from services.ledger.domain.chain import GENESIS_HASH
from services.ledger.domain.receipt import Receipt, verify_receipt

FORMATS = Path(__file__).resolve().parents[3] / "services" / "ledger" / "FORMATS.md"


def example_receipt() -> dict[str, object]:
    text = FORMATS.read_text()
    block = re.search(r'```json\n(\{\n  "format": "p2pgrid-ledger-receipt-v1".*?)\n```', text, re.S)
    assert block is not None, "FORMATS.md lost its example receipt"
    data: dict[str, object] = json.loads(block.group(1))
    return data


def test_the_documented_receipt_verifies_with_the_documented_key() -> None:
    data = example_receipt()
    checkpoint = data["checkpoint"]
    assert isinstance(checkpoint, dict)
    verify_receipt(Receipt.from_json(data), bytes.fromhex(checkpoint["public_key"]))


def test_the_documented_hashes_follow_the_documented_rules() -> None:
    data = example_receipt()
    entry = str(data["entry"]).encode()
    leaf = hashlib.sha256(b"\x00" + entry).digest()
    proof = [bytes.fromhex(h) for h in data["inclusion_proof"]]  # type: ignore[attr-defined]
    # Leaf 1 of 3: its sibling is leaf 0, then the subtree of leaf 2.
    root = hashlib.sha256(b"\x01" + hashlib.sha256(b"\x01" + proof[0] + leaf).digest() + proof[1]).digest()
    checkpoint = data["checkpoint"]
    assert isinstance(checkpoint, dict)
    assert root.hex() == checkpoint["root_hash"]
    head = GENESIS_HASH
    for entry_hash in (proof[0], leaf, proof[1]):
        head = hashlib.sha256(head + entry_hash).digest()
    assert head.hex() == checkpoint["chain_head"]
