"""Exact integer units of the market and their conversions at the edges.

Energy is whole watt-hours (`*_wh`), power whole watts (`*_w`), prices whole
micro-currency per kWh (`*_micro_per_kwh`) and money whole nano-currency
(`*_nano`). With these scales `energy_wh * price_micro_per_kwh` is exactly an
amount in nano-currency: 1 Wh at 1 micro/kWh = 1e-3 kWh * 1e-6 = 1e-9.
Floats and decimals appear only where values enter or leave the system, and
are converted here, never rounded anywhere else.
"""

from __future__ import annotations

from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import NewType

EnergyWh = NewType("EnergyWh", int)
PowerW = NewType("PowerW", int)
PriceMicroPerKwh = NewType("PriceMicroPerKwh", int)
AmountNano = NewType("AmountNano", int)

MICRO_PER_UNIT = 1_000_000
NANO_PER_UNIT = 1_000_000_000
WH_PER_KWH = 1_000
SECONDS_PER_HOUR = 3_600


class UnitError(ValueError):
    """A value that cannot be represented exactly in the market's units."""


def amount_nano(energy_wh: int, price_micro_per_kwh: int) -> int:
    """Money for `energy_wh` at `price_micro_per_kwh`, exact by construction of the scales."""
    return energy_wh * price_micro_per_kwh


def price_micro_from_decimal(text: str | Decimal, *, field: str = "price_per_kwh") -> int:
    """Parse a price in currency per kWh (e.g. "0.2075") into exact micro-currency per kWh.

    Rejects values with more than six decimal places rather than rounding them.
    """
    try:
        value = Decimal(text) if isinstance(text, str) else text
    except InvalidOperation as exc:
        raise UnitError(f"{field}: {text!r} is not a decimal number") from exc
    if not value.is_finite():
        raise UnitError(f"{field}: {text!r} is not a finite number")
    micro = value * MICRO_PER_UNIT
    if micro != micro.to_integral_value():
        raise UnitError(f"{field}: {text!r} has more than 6 decimal places (finer than 1 micro-currency)")
    return int(micro)


def price_decimal_from_micro(price_micro_per_kwh: int) -> Decimal:
    """The price in currency per kWh, exactly, for display and CSV output."""
    return Decimal(price_micro_per_kwh) / MICRO_PER_UNIT


def amount_decimal_from_nano(amount_nano_: int) -> Decimal:
    """An amount in whole currency, exactly, for display."""
    return Decimal(amount_nano_) / NANO_PER_UNIT


def energy_wh_from_kwh_float(value_kwh: float) -> int:
    """Round a meter's float kWh register to whole Wh (half to even), the one rounding at the edge."""
    return int(Decimal(repr(value_kwh)).scaleb(3).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def energy_wh_for_power(power_w: int, duration_s: int) -> Decimal:
    """Energy in Wh (exact, as a Decimal) of a constant power over a duration."""
    return Decimal(power_w * duration_s) / SECONDS_PER_HOUR


def line_energy_limit_wh(capacity_w: int, interval_s: int) -> Decimal:
    """What a line of `capacity_w` can carry in one interval, in Wh (exact)."""
    return energy_wh_for_power(capacity_w, interval_s)
