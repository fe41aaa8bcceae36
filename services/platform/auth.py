"""Per-call authentication from a signed bearer token (services.domain.credentials) for any service.

The token names the caller's Ed25519 key; the participant id is derived from
it. Operators are the keys listed in the service's settings. A service that
keeps a register of participants passes `is_known` so that only registered
keys (and operators) are accepted.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from services.domain.credentials import check_token_time, from_b64url, verify_token
from services.domain.errors import Unauthenticated
from services.platform.grpc_server import Identity

AUTH_HEADER = "authorization"
BEARER = "bearer "


def parse_operator_keys(text: str) -> frozenset[bytes]:
    """Comma-separated base64url Ed25519 public keys, as given in settings."""
    keys = set()
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        key = from_b64url(part)
        if len(key) != 32:
            raise ValueError(f"operator key {part!r} is not a 32-byte Ed25519 public key")
        keys.add(key)
    return frozenset(keys)


def bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    for key, value in metadata:
        if key.lower() == AUTH_HEADER:
            text = value.decode() if isinstance(value, bytes) else value
            if text.lower().startswith(BEARER):
                return text[len(BEARER) :].strip()
            raise Unauthenticated("the authorization metadata must read 'Bearer <token>'")
    raise Unauthenticated("this call needs credentials: send 'authorization: Bearer <token>' metadata")


class TokenAuthenticator:
    """Verifies the bearer token of every call for one audience."""

    def __init__(
        self,
        audience: str,
        *,
        operator_keys: frozenset[bytes] = frozenset(),
        max_lifetime_s: int = 3600,
        skew_s: float = 30.0,
        is_known: Callable[[str], bool] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.operator_keys = operator_keys
        self.max_lifetime_s = max_lifetime_s
        self.skew_s = skew_s
        self.is_known = is_known
        self.wall_clock = wall_clock

    def authenticate(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        claims = verify_token(bearer_token(metadata), self.audience, max_lifetime_s=self.max_lifetime_s)
        check_token_time(claims, self.wall_clock(), self.skew_s)
        operator = claims.public_key in self.operator_keys
        if not operator and self.is_known is not None and not self.is_known(claims.participant_id):
            raise Unauthenticated(f"participant {claims.participant_id} is not registered")
        return Identity(participant_id=claims.participant_id, operator=operator)
