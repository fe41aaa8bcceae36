"""Per-call authentication of the order book: the bearer token (services.domain.credentials) becomes the Identity.

Like the platform's TokenAuthenticator, with two differences the order book
needs. A token's signature is verified once and then remembered until the
token expires, so a bot that reuses its token pays a dictionary lookup per
call instead of an Ed25519 verification; the token's time window is still
checked against the wall clock on every call. And RegisterParticipant
accepts a valid token from a key that is not registered yet (that call is
how a key gets registered: the token is its proof of possession); every
other method requires a registered participant or an operator.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from services.domain.credentials import TokenClaims, check_token_time, verify_token
from services.domain.errors import Unauthenticated
from services.platform.auth import bearer_token
from services.platform.grpc_server import Identity

REGISTER_METHOD = "/p2pgrid.orderbook.v1.OrderBook/RegisterParticipant"
_CACHE_MAX = 100_000


class CachingTokenAuthenticator:
    """Checks call tokens for one audience; operators are the holders of the configured keys."""

    def __init__(
        self,
        audience: str,
        *,
        is_registered: Callable[[str], bool],
        operator_keys: frozenset[bytes] = frozenset(),
        max_lifetime_s: int = 3600,
        skew_s: float = 30.0,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.audience = audience
        self.is_registered = is_registered
        self.operator_keys = operator_keys
        self.max_lifetime_s = max_lifetime_s
        self.skew_s = skew_s
        self.wall_clock = wall_clock
        self._verified: dict[str, TokenClaims] = {}

    def authenticate(self, method: str, metadata: Sequence[tuple[str, str | bytes]]) -> Identity:
        token = bearer_token(metadata)
        now_s = self.wall_clock()
        claims = self._verified.get(token)
        if claims is None:
            claims = verify_token(token, self.audience, max_lifetime_s=self.max_lifetime_s)
            check_token_time(claims, now_s, self.skew_s)
            if len(self._verified) >= _CACHE_MAX:
                self._evict(now_s)
            self._verified[token] = claims
        else:
            check_token_time(claims, now_s, self.skew_s)
        operator = claims.public_key in self.operator_keys
        if not operator and method != REGISTER_METHOD and not self.is_registered(claims.participant_id):
            raise Unauthenticated(
                f"participant {claims.participant_id} is not registered; call RegisterParticipant first"
            )
        return Identity(claims.participant_id, operator=operator)

    def _evict(self, now_s: float) -> None:
        live = {t: c for t, c in self._verified.items() if c.expires_at_s + self.skew_s >= now_s}
        self._verified = live if len(live) < _CACHE_MAX // 2 else {}
