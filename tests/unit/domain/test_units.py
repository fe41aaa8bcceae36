"""Money and energy are exact integers: conversions at the edges never round silently."""

from __future__ import annotations

from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.domain.units import (
    UnitError,
    amount_decimal_from_nano,
    amount_nano,
    energy_wh_from_kwh_float,
    line_energy_limit_wh,
    price_decimal_from_micro,
    price_micro_from_decimal,
)


def test_a_price_in_currency_per_kwh_becomes_exact_micro_currency() -> None:
    assert price_micro_from_decimal("0.2075") == 207_500
    assert price_micro_from_decimal("-0.01") == -10_000


@pytest.mark.parametrize("text", ["0.1234567", "abc", "NaN", "Infinity", ""])
def test_a_price_finer_than_a_micro_or_not_a_number_is_refused(text: str) -> None:
    with pytest.raises(UnitError, match="price_per_kwh"):
        price_micro_from_decimal(text)


def test_one_kwh_at_one_currency_per_kwh_costs_exactly_one_currency() -> None:
    assert amount_decimal_from_nano(amount_nano(1_000, 1_000_000)) == Decimal(1)


@given(st.integers(min_value=-(10**9), max_value=10**9))
def test_prices_round_trip_through_decimals(price_micro_per_kwh: int) -> None:
    assert price_micro_from_decimal(price_decimal_from_micro(price_micro_per_kwh)) == price_micro_per_kwh


def test_a_float_kwh_register_rounds_to_whole_wh_half_to_even() -> None:
    assert energy_wh_from_kwh_float(12.3455) == 12_346
    assert energy_wh_from_kwh_float(12.3445) == 12_344
    assert energy_wh_from_kwh_float(0.0005) == 0
    assert energy_wh_from_kwh_float(0.0015) == 2
    assert energy_wh_from_kwh_float(65536.1) == 65_536_100


def test_a_50_kw_line_carries_12500_wh_in_a_quarter_hour() -> None:
    assert line_energy_limit_wh(50_000, 900) == Decimal(12_500)
