"""The order book's token authenticator (verified once, time-checked always) and its settings checks."""

from __future__ import annotations

import pytest

from services.domain.credentials import ORDER_BOOK_AUDIENCE, b64url, make_token
from services.domain.errors import Unauthenticated
from services.order_book.adapters.auth import REGISTER_METHOD, CachingTokenAuthenticator
from services.order_book.client import BotKey
from services.order_book.settings import DESCRIPTION, Settings
from services.platform.settings import SettingsError, load_settings

NOW = 1_800_000_000.0
PLACE = "/p2pgrid.orderbook.v1.OrderBook/PlaceOrder"


class Wall:
    def __init__(self, now_s: float) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


def metadata(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_a_cached_token_still_expires_and_unregistered_keys_may_only_register() -> None:
    key, operator = BotKey.generate(), BotKey.generate()
    registered: set[str] = set()
    wall = Wall(NOW)
    authenticator = CachingTokenAuthenticator(
        ORDER_BOOK_AUDIENCE,
        is_registered=registered.__contains__,
        operator_keys=frozenset({operator.public_key}),
        max_lifetime_s=600,
        skew_s=5,
        wall_clock=wall,
    )
    token = make_token(key.signing_key, ORDER_BOOK_AUDIENCE, int(NOW), int(NOW) + 60)
    assert authenticator.authenticate(REGISTER_METHOD, metadata(token)).participant_id == key.participant_id
    with pytest.raises(Unauthenticated, match="not registered"):
        authenticator.authenticate(PLACE, metadata(token))
    registered.add(key.participant_id)
    identity = authenticator.authenticate(PLACE, metadata(token))
    assert (identity.participant_id, identity.operator) == (key.participant_id, False)
    wall.now_s = NOW + 66
    with pytest.raises(Unauthenticated, match="expired"):
        authenticator.authenticate(PLACE, metadata(token))
    operator_token = make_token(operator.signing_key, ORDER_BOOK_AUDIENCE, int(NOW), int(NOW) + 600)
    assert authenticator.authenticate(PLACE, metadata(operator_token)).operator


def test_a_token_with_a_swapped_key_does_not_reuse_a_cached_verification() -> None:
    a, b = BotKey.generate(), BotKey.generate()
    authenticator = CachingTokenAuthenticator(
        ORDER_BOOK_AUDIENCE, is_registered=lambda _p: True, wall_clock=Wall(NOW)
    )
    genuine = make_token(a.signing_key, ORDER_BOOK_AUDIENCE, int(NOW), int(NOW) + 60)
    authenticator.authenticate(PLACE, metadata(genuine))
    parts = genuine.split(".")
    parts[1] = b64url(b.public_key)
    with pytest.raises(Unauthenticated, match="forged"):
        authenticator.authenticate(PLACE, metadata(".".join(parts)))
    with pytest.raises(Unauthenticated, match="credentials"):
        authenticator.authenticate(PLACE, ())


def load(**flags: str) -> Settings:
    argv = ["--nats-url", "nats://127.0.0.1:1", "--database-url", "sqlite:///x.db"]
    for name, value in flags.items():
        argv += [f"--{name.replace('_', '-')}", value]
    return load_settings(
        Settings,
        prog="order_book",
        env_prefix="P2PGRID_ORDER_BOOK_",
        description=DESCRIPTION,
        argv=argv,
        environ={},
    )


def test_settings_build_the_market_rules_and_operator_keys() -> None:
    operator = BotKey.generate()
    settings = load(nodes="a, b", operator_public_keys=b64url(operator.public_key), interval_s="60")
    assert settings.market_rules().nodes == frozenset({"a", "b"})
    assert settings.operator_keys() == frozenset({operator.public_key})


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        ({"rate_limit_burst": "10", "max_batch_orders": "100"}, "--rate-limit-burst"),
        ({"operator_public_keys": "abc"}, "--operator-public-keys"),
        ({"nodes": " , "}, "--nodes"),
        ({"gate_closure_s": "-1"}, "--gate-closure-s"),
        ({"grid_file": "/nonexistent/grid.yaml"}, "--grid-file"),
        ({"min_price_micro_per_kwh": "500", "max_price_micro_per_kwh": "100"}, "--min-price-micro-per-kwh"),
    ],
)
def test_bad_settings_name_the_flag(flags: dict[str, str], name: str) -> None:
    with pytest.raises(SettingsError) as info:
        load(**flags)
    assert info.value.name == name


def test_nodes_come_from_a_grid_file_when_given(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "grid.yaml"
    path.write_text("slack: n0\nnodes: [{id: n0}, {id: 7}]\nlines: []\n")
    assert load(grid_file=str(path)).node_ids() == ["n0", "7"]
