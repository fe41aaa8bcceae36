"""Per-call authentication: the `authorization: Bearer <token>` metadata becomes the caller's Identity.

A token's signature is verified once and then remembered until it expires,
so a bot that reuses its token pays one dictionary lookup per call. Token
times are checked against the wall clock on every call.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from services.domain.errors import Unauthenticated
from services.order_book.domain.credentials import TokenClaims, check_token_time, verify_token
from services.platform.grpc_server import Identity

AUTH_METADATA_KEY = "authorization"
BEARER = "Bearer "
_CACHE_MAX = 100_000


class TokenAuthenticator:
    """Checks call tokens for one audience; operators are the holders of the configured keys."""

    def __init__(
        self,
        audience: str,
        *,
        operator_keys: frozenset[bytes] = frozenset(),
        max_lifetime_s: int = 3600,
        skew_s: float = 30.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.operator_keys = operator_keys
        self.max_lifetime_s = max_lifetime_s
        self.skew_s = skew_s
        self.wall_clock = wall_clock
        self._verified: dict[str, TokenClaims] = {}

    def authenticate(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        token = _bearer_token(metadata)
        claims = self._verified.get(token)
        now_s = self.wall_clock()
        if claims is None:
            claims = verify_token(token, self.audience, max_lifetime_s=self.max_lifetime_s)
            check_token_time(claims, now_s, self.skew_s)
            if len(self._verified) >= _CACHE_MAX:
                self._evict(now_s)
            self._verified[token] = claims
        else:
            check_token_time(claims, now_s, self.skew_s)
        return Identity(claims.participant_id, operator=claims.public_key in self.operator_keys)

    def _evict(self, now_s: float) -> None:
        live = {t: c for t, c in self._verified.items() if c.expires_at_s + self.skew_s >= now_s}
        self._verified = live if len(live) < _CACHE_MAX // 2 else {}


def _bearer_token(metadata: Sequence[tuple[str, str | bytes]]) -> str:
    for key, value in metadata:
        if key == AUTH_METADATA_KEY:
            text = value.decode(errors="replace") if isinstance(value, bytes) else value
            if not text.startswith(BEARER):
                raise Unauthenticated("the authorization metadata must read 'Bearer <token>'")
            return text[len(BEARER) :].strip()
    raise Unauthenticated(
        "missing credentials: send metadata 'authorization: Bearer p2pgrid-v1.<key>.<issued>.<expires>.<signature>'"
    )
