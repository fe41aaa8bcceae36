"""The canonical order bytes, their signature, and the refusal of non-canonical (malleated) signatures."""

from __future__ import annotations

import struct

import nacl.exceptions
import nacl.signing
import pytest

from services.domain.credentials import GROUP_ORDER_L, is_canonical_signature, verify_signature
from services.order_book.client import BotKey, signed_order
from services.order_book.domain.orders import OrderBody, Side, canonical_order_bytes, encode_order

SEED = bytes(range(32))
BODY = OrderBody("pv-1", Side.SELL, "n1", 1_800_000_000, 1500, 123_400)
# Ed25519 is deterministic: this is the signature of BODY's canonical bytes by SEED, for ever.
GOLDEN_SIGNATURE = bytes.fromhex(
    "a85d795249db45f6d7520067eca15164606eb03bac47e2b630d72728171fddf6"
    "31e0132d41223286e7b984306d7abeb8715d1bd1d1e56fc4d031e3ccf661610e"
)


def malleate(signature: bytes) -> bytes:
    """The same signature with S replaced by S + L: equal modulo L, so a lax verifier accepts it."""
    s_value = int.from_bytes(signature[32:], "little") + GROUP_ORDER_L
    return signature[:32] + s_value.to_bytes(32, "little")


def test_the_canonical_bytes_follow_the_documented_layout() -> None:
    expected = (
        b"p2pgrid/order/v1\x00"
        + struct.pack(">H", 4)
        + b"pv-1"
        + bytes([2])
        + struct.pack(">H", 2)
        + b"n1"
        + struct.pack(">qqq", 1_800_000_000, 1500, 123_400)
    )
    assert canonical_order_bytes(BODY) == expected
    assert len(expected) == 17 + 2 + 4 + 1 + 2 + 2 + 24


def test_length_prefixes_keep_neighbouring_strings_apart() -> None:
    one = encode_order("ab", 1, "c", 900, 1, 100)
    other = encode_order("a", 1, "bc", 900, 1, 100)
    assert one != other


@pytest.mark.parametrize(
    "changed",
    [
        OrderBody("pv-2", Side.SELL, "n1", 1_800_000_000, 1500, 123_400),
        OrderBody("pv-1", Side.BUY, "n1", 1_800_000_000, 1500, 123_400),
        OrderBody("pv-1", Side.SELL, "n2", 1_800_000_000, 1500, 123_400),
        OrderBody("pv-1", Side.SELL, "n1", 1_800_000_900, 1500, 123_400),
        OrderBody("pv-1", Side.SELL, "n1", 1_800_000_000, 1501, 123_400),
        OrderBody("pv-1", Side.SELL, "n1", 1_800_000_000, 1500, 123_500),
    ],
)
def test_every_field_is_covered_by_the_signature(changed: OrderBody) -> None:
    key = nacl.signing.SigningKey(SEED)
    assert not verify_signature(key.verify_key, canonical_order_bytes(changed), GOLDEN_SIGNATURE)


def test_the_golden_signature_verifies_and_the_client_produces_it() -> None:
    key = BotKey.from_seed(SEED)
    assert verify_signature(
        nacl.signing.VerifyKey(key.public_key), canonical_order_bytes(BODY), GOLDEN_SIGNATURE
    )
    request = signed_order(key, BODY.side, BODY.node_id, BODY.interval_start_s, 1500, 123_400, "pv-1")
    assert request.signature == GOLDEN_SIGNATURE


def test_a_malleated_signature_is_refused_by_libsodium_itself_and_by_the_canonical_check() -> None:
    key = nacl.signing.SigningKey(SEED)
    message = canonical_order_bytes(BODY)
    forged = malleate(GOLDEN_SIGNATURE)
    assert forged != GOLDEN_SIGNATURE and len(forged) == 64
    with pytest.raises(nacl.exceptions.BadSignatureError):
        key.verify_key.verify(message, forged)
    assert not is_canonical_signature(forged)
    assert not verify_signature(key.verify_key, message, forged)


def test_the_canonical_check_draws_the_line_exactly_at_the_group_order() -> None:
    r_part = GOLDEN_SIGNATURE[:32]
    assert is_canonical_signature(r_part + (GROUP_ORDER_L - 1).to_bytes(32, "little"))
    assert not is_canonical_signature(r_part + GROUP_ORDER_L.to_bytes(32, "little"))
    assert not is_canonical_signature(GOLDEN_SIGNATURE[:63])


def test_values_the_layout_cannot_hold_are_refused() -> None:
    with pytest.raises(ValueError):
        encode_order("x" * 70_000, 1, "n1", 900, 1, 100)
    with pytest.raises(struct.error):
        encode_order("x", 1, "n1", 2**63, 1, 100)
