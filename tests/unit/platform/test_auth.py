"""Call tokens: only a fresh token signed by the caller's key for this service's audience authenticates."""

from __future__ import annotations

import nacl.signing
import pytest

from services.domain.credentials import GRID_CHECK_AUDIENCE, LEDGER_AUDIENCE, b64url, make_token
from services.domain.errors import Unauthenticated
from services.domain.ids import participant_id_from_public_key
from services.platform.auth import TokenAuthenticator, parse_operator_keys

NOW_S = 1_800_000_000


def metadata(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def authenticator(**kwargs: object) -> TokenAuthenticator:
    return TokenAuthenticator(GRID_CHECK_AUDIENCE, wall_clock=lambda: NOW_S, **kwargs)  # type: ignore[arg-type]


def test_a_fresh_token_identifies_the_participant_derived_from_its_key() -> None:
    key = nacl.signing.SigningKey.generate()
    identity = authenticator().authenticate(
        "/m", metadata(make_token(key, GRID_CHECK_AUDIENCE, NOW_S - 5, NOW_S + 60))
    )
    assert identity.participant_id == participant_id_from_public_key(bytes(key.verify_key))
    assert not identity.operator


def test_an_operator_is_recognised_by_its_configured_public_key() -> None:
    key = nacl.signing.SigningKey.generate()
    operators = parse_operator_keys(f" {b64url(bytes(key.verify_key))} ,")
    identity = authenticator(operator_keys=operators).authenticate(
        "/m", metadata(make_token(key, GRID_CHECK_AUDIENCE, NOW_S, NOW_S + 60))
    )
    assert identity.operator


@pytest.mark.parametrize(
    ("issued_s", "expires_s", "audience", "reason"),
    [
        (NOW_S - 600, NOW_S - 100, GRID_CHECK_AUDIENCE, "expired"),
        (NOW_S + 300, NOW_S + 400, GRID_CHECK_AUDIENCE, "future"),
        (NOW_S, NOW_S + 60, LEDGER_AUDIENCE, "forged"),
        (NOW_S, NOW_S + 86_400, GRID_CHECK_AUDIENCE, "lifetime"),
    ],
)
def test_expired_future_other_audience_and_long_lived_tokens_are_refused(
    issued_s: int, expires_s: int, audience: str, reason: str
) -> None:
    token = make_token(nacl.signing.SigningKey.generate(), audience, issued_s, expires_s)
    with pytest.raises(Unauthenticated, match=reason):
        authenticator().authenticate("/m", metadata(token))


def test_a_token_whose_key_was_swapped_is_forged() -> None:
    token = make_token(nacl.signing.SigningKey.generate(), GRID_CHECK_AUDIENCE, NOW_S, NOW_S + 60)
    other = b64url(bytes(nacl.signing.SigningKey.generate().verify_key))
    parts = token.split(".")
    parts[1] = other
    with pytest.raises(Unauthenticated, match="forged"):
        authenticator().authenticate("/m", metadata(".".join(parts)))


def test_missing_or_malformed_credentials_are_unauthenticated() -> None:
    with pytest.raises(Unauthenticated, match="needs credentials"):
        authenticator().authenticate("/m", [])
    with pytest.raises(Unauthenticated, match="Bearer"):
        authenticator().authenticate("/m", [("authorization", "Basic abc")])
    with pytest.raises(Unauthenticated, match="malformed"):
        authenticator().authenticate("/m", metadata("p2pgrid-v1.x.y"))


def test_an_unregistered_participant_is_refused_when_the_service_keeps_a_register() -> None:
    key = nacl.signing.SigningKey.generate()
    with pytest.raises(Unauthenticated, match="not registered"):
        authenticator(is_known=lambda _pid: False).authenticate(
            "/m", metadata(make_token(key, GRID_CHECK_AUDIENCE, NOW_S, NOW_S + 60))
        )
