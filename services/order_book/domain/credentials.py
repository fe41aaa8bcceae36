"""Ed25519 credentials: the short-lived call token bound to a participant's key, and order signature checks.

Token format (sent as gRPC metadata `authorization: Bearer <token>`):

    p2pgrid-v1.<public_key>.<issued_at_s>.<expires_at_s>.<signature>

`public_key` (32 bytes) and `signature` (64 bytes) are base64url without
padding; the times are decimal Unix seconds on the wall clock (UTC), never a
simulated market clock. The signature is Ed25519, by that public key, over

    b"p2pgrid-auth-v1\\x00" + audience (UTF-8) + b"\\x00" + public_key
    + issued_at_s (i64 big-endian) + expires_at_s (i64 big-endian)

where `audience` names the service the token is for (the order book's is
`p2pgrid.orderbook.v1`), so a token for one service is useless at another. A
token is accepted while `issued_at_s - skew <= now <= expires_at_s + skew`
and only if `expires_at_s - issued_at_s` is at most the service's maximum
lifetime. The participant id is derived from the public key, so the token
proves both who calls and that the caller holds the key.

Signatures (tokens and orders) must be canonical: the scalar S is below the
group order L. libsodium's verification already rejects S >= L and
small-order keys; the explicit check here keeps that true whatever the
library version.
"""

from __future__ import annotations

import base64
import binascii
import struct
from dataclasses import dataclass

import nacl.bindings
import nacl.exceptions
import nacl.signing

from services.domain.errors import Unauthenticated
from services.domain.ids import participant_id_from_public_key

TOKEN_VERSION = "p2pgrid-v1"
TOKEN_MAGIC = b"p2pgrid-auth-v1\x00"
ORDER_BOOK_AUDIENCE = "p2pgrid.orderbook.v1"
PUBLIC_KEY_BYTES = 32
SIGNATURE_BYTES = 64
# The order of the Ed25519 base point; a canonical signature's S is below it.
GROUP_ORDER_L = 2**252 + 27742317777372353535851937790883648493
_TIMES = struct.Struct(">qq")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def from_b64url(text: str) -> bytes:
    if not text or any(c in text for c in "=+/ \t\r\n"):
        raise ValueError("not unpadded base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError("not base64url") from exc


def is_canonical_signature(signature: bytes) -> bool:
    """64 bytes whose scalar half S (little-endian) is below the group order."""
    return len(signature) == SIGNATURE_BYTES and int.from_bytes(signature[32:], "little") < GROUP_ORDER_L


def is_valid_public_key(public_key: bytes) -> bool:
    """32 bytes encoding a point on the curve that is not of small order."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        return False
    return bool(nacl.bindings.crypto_core_ed25519_is_valid_point(public_key))


def verify_signature(verify_key: nacl.signing.VerifyKey, message: bytes, signature: bytes) -> bool:
    """True if `signature` is a canonical Ed25519 signature of `message` by `verify_key`."""
    if not is_canonical_signature(signature):
        return False
    try:
        verify_key.verify(message, signature)
    except nacl.exceptions.BadSignatureError:
        return False
    return True


def token_message(audience: str, public_key: bytes, issued_at_s: int, expires_at_s: int) -> bytes:
    return b"".join(
        (TOKEN_MAGIC, audience.encode(), b"\x00", public_key, _TIMES.pack(issued_at_s, expires_at_s))
    )


def make_token(
    signing_key: nacl.signing.SigningKey, audience: str, issued_at_s: int, expires_at_s: int
) -> str:
    """A call token for `audience`, valid from `issued_at_s` to `expires_at_s` (wall-clock Unix seconds)."""
    public_key = bytes(signing_key.verify_key)
    signature = signing_key.sign(token_message(audience, public_key, issued_at_s, expires_at_s)).signature
    return ".".join(
        (TOKEN_VERSION, b64url(public_key), str(issued_at_s), str(expires_at_s), b64url(signature))
    )


@dataclass(frozen=True, slots=True)
class TokenClaims:
    """What a verified token proves."""

    public_key: bytes
    participant_id: str
    issued_at_s: int
    expires_at_s: int


def verify_token(token: str, audience: str, *, max_lifetime_s: int) -> TokenClaims:
    """Check a token's form and signature (not its time window); raises Unauthenticated saying why."""
    parts = token.split(".")
    if len(parts) != 5 or parts[0] != TOKEN_VERSION:
        raise Unauthenticated(
            f"malformed token: expected {TOKEN_VERSION}.<key>.<issued>.<expires>.<signature>"
        )
    try:
        public_key = from_b64url(parts[1])
        signature = from_b64url(parts[4])
        issued_at_s = int(parts[2])
        expires_at_s = int(parts[3])
    except ValueError:
        raise Unauthenticated("malformed token: bad key, time or signature encoding") from None
    if len(public_key) != PUBLIC_KEY_BYTES or not is_valid_public_key(public_key):
        raise Unauthenticated("malformed token: the public key is not a valid Ed25519 key")
    if not (0 <= issued_at_s < expires_at_s < 2**62):
        raise Unauthenticated("malformed token: it must expire after it is issued")
    if expires_at_s - issued_at_s > max_lifetime_s:
        raise Unauthenticated(
            f"token lifetime {expires_at_s - issued_at_s} s exceeds the maximum {max_lifetime_s} s"
        )
    message = token_message(audience, public_key, issued_at_s, expires_at_s)
    if not verify_signature(nacl.signing.VerifyKey(public_key), message, signature):
        raise Unauthenticated("forged token: the signature does not verify for this key and audience")
    return TokenClaims(public_key, participant_id_from_public_key(public_key), issued_at_s, expires_at_s)


def check_token_time(claims: TokenClaims, now_s: float, skew_s: float) -> None:
    """Raise Unauthenticated if the token is not yet valid or has expired at wall time `now_s`."""
    if now_s > claims.expires_at_s + skew_s:
        raise Unauthenticated(f"token expired at {claims.expires_at_s} (now {int(now_s)}); make a new one")
    if now_s < claims.issued_at_s - skew_s:
        raise Unauthenticated(
            f"token issued in the future ({claims.issued_at_s}, now {int(now_s)}); check the clock"
        )
