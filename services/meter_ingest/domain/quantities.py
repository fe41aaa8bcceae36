"""The canonical quantities a meter reading may carry, their units and how good each value is.

Every register map names its quantities from this one vocabulary, so a
reading from any meter model means the same thing downstream: energy
counters in whole Wh (import and export separately), power in whole W with
import from the grid positive, voltage in V, current in A, frequency in Hz.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Kind(StrEnum):
    """Whether a quantity is a cumulative counter or an instantaneous gauge."""

    COUNTER = "counter"
    GAUGE = "gauge"


@dataclass(frozen=True, slots=True)
class QuantitySpec:
    """One canonical quantity: its name, unit, kind and whether values are whole numbers."""

    name: str
    unit: str
    kind: Kind
    integer: bool


def _spec(name: str, unit: str, kind: Kind = Kind.GAUGE, integer: bool = False) -> QuantitySpec:
    return QuantitySpec(name=name, unit=unit, kind=kind, integer=integer)


QUANTITIES: dict[str, QuantitySpec] = {
    spec.name: spec
    for spec in (
        _spec("energy_import_wh", "Wh", Kind.COUNTER, integer=True),
        _spec("energy_export_wh", "Wh", Kind.COUNTER, integer=True),
        _spec("power_w", "W", integer=True),
        _spec("power_l1_w", "W", integer=True),
        _spec("power_l2_w", "W", integer=True),
        _spec("power_l3_w", "W", integer=True),
        _spec("voltage_l1_v", "V"),
        _spec("voltage_l2_v", "V"),
        _spec("voltage_l3_v", "V"),
        _spec("current_l1_a", "A"),
        _spec("current_l2_a", "A"),
        _spec("current_l3_a", "A"),
        _spec("frequency_hz", "Hz"),
    )
}

ENERGY_COUNTERS: tuple[str, ...] = ("energy_import_wh", "energy_export_wh")


class Quality(StrEnum):
    """How good one value is. Anything but OK carries no value: invalid is never 0."""

    OK = "ok"
    # The register holds the model's "not implemented" sentinel.
    NOT_IMPLEMENTED = "not_implemented"
    # A float register holds NaN or an infinity.
    NAN = "nan"
    # The SunSpec scale factor the value depends on is itself invalid.
    INVALID_SCALE_FACTOR = "invalid_scale_factor"
    # The meter answered the read with a Modbus exception response.
    EXCEPTION = "exception"
    # The meter did not answer within the timeout.
    TIMEOUT = "timeout"
    # No connection to the meter or its gateway.
    UNREACHABLE = "unreachable"
    # The registers were not read at all (not in the image).
    NO_DATA = "no_data"
    # A configuration register holds a value the map does not know, so the meaning is unknown.
    UNKNOWN_CONFIG = "unknown_config"
    # Validation: outside the map's plausible range.
    OUT_OF_RANGE = "out_of_range"
    # Validation: an energy counter below its last accepted value without a reset event.
    COUNTER_BACKWARDS = "counter_backwards"
    # Validation: an energy counter rose faster than the meter's maximum power allows.
    COUNTER_JUMP = "counter_jump"


Number = int | float


@dataclass(frozen=True, slots=True)
class QuantityValue:
    """One decoded value in canonical units, or None with the reason it is not usable."""

    value: Number | None
    quality: Quality = Quality.OK
    detail: str = ""

    def __post_init__(self) -> None:
        if (self.quality is Quality.OK) != (self.value is not None):
            raise ValueError(f"a value must be present exactly when quality is ok, got {self!r}")

    @property
    def ok(self) -> bool:
        return self.quality is Quality.OK

    @classmethod
    def invalid(cls, quality: Quality, detail: str = "") -> QuantityValue:
        return cls(None, quality, detail)
