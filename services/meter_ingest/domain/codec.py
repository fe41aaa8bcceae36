"""Pure decoding (and encoding) of meter registers: `decode(map, registers)` → canonical values.

Raw words become one unsigned number (byte order within each register, then
word order across registers), "not implemented" sentinels are checked on
that raw number, then the typed value is scaled exactly with `Decimal` into
the quantity's canonical unit. Anything that is not a real measurement comes
back as an invalid `QuantityValue` with its reason, never as 0.

Float32 registers are read as the shortest decimal that maps to the same
float32 (230.4, not 230.39999389648438): that is the number the meter
holds to its own precision, and it keeps whole-Wh rounding monotone.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_EVEN, Decimal
from typing import Literal

import numpy as np

from services.meter_ingest.domain.quantities import QUANTITIES, Number, Quality, QuantityValue
from services.meter_ingest.domain.register_map import (
    ConfigEffect,
    Encoding,
    Field,
    Quantity,
    RegisterBlock,
    RegisterMap,
    ValueType,
)


class EncodeError(ValueError):
    """A value that cannot be written into its register type (too large, wrong sign)."""


@dataclass(frozen=True, slots=True)
class BlockFailure:
    """A read of registers that failed, so every value inside it is invalid for this reason."""

    function: int
    address: int
    count: int
    quality: Quality
    detail: str = ""

    def covers(self, function: int, address: int, count: int) -> bool:
        return (
            function == self.function
            and address < self.address + self.count
            and self.address < address + count
        )


class RegisterImage:
    """The registers read from one meter in one poll, per function code, plus the reads that failed."""

    def __init__(self) -> None:
        self._words: dict[int, dict[int, int]] = {3: {}, 4: {}}
        self.failures: list[BlockFailure] = []

    @classmethod
    def from_blocks(cls, blocks: Iterable[RegisterBlock]) -> RegisterImage:
        image = cls()
        for block in blocks:
            image.put(block.function, block.address, block.words)
        return image

    def put(self, function: int, address: int, words: Sequence[int]) -> None:
        space = self._words.setdefault(function, {})
        for i, word in enumerate(words):
            space[address + i] = word

    def fail(self, function: int, address: int, count: int, quality: Quality, detail: str = "") -> None:
        self.failures.append(BlockFailure(function, address, count, quality, detail))

    def get(self, function: int, address: int, count: int) -> list[int] | None:
        space = self._words.get(function, {})
        words: list[int] = []
        for a in range(address, address + count):
            word = space.get(a)
            if word is None:
                return None
            words.append(word)
        return words

    def failure_for(self, function: int, address: int, count: int) -> BlockFailure | None:
        for failure in self.failures:
            if failure.covers(function, address, count):
                return failure
        return None

    def blocks(self) -> list[RegisterBlock]:
        """The image as maximal runs of consecutive registers (used to serve it from a simulator)."""
        result: list[RegisterBlock] = []
        for function in sorted(self._words):
            space = self._words[function]
            run: list[int] = []
            start = -1
            for address in sorted(space):
                if run and address == start + len(run):
                    run.append(space[address])
                    continue
                if run:
                    result.append(RegisterBlock(function, start, tuple(run)))
                start, run = address, [space[address]]
            if run:
                result.append(RegisterBlock(function, start, tuple(run)))
        return result


# --------------------------------------------------------------------------- raw values


def words_to_raw(words: Sequence[int], encoding: Encoding) -> int:
    """The register words of one value as one unsigned big-endian number."""
    ordered = list(reversed(words)) if encoding.word_order == "little" else list(words)
    byte_order: Literal["big", "little"] = "big" if encoding.byte_order == "big" else "little"
    data = b"".join(w.to_bytes(2, byte_order) for w in ordered)
    return int.from_bytes(data, "big")


def raw_to_words(raw: int, count: int, encoding: Encoding) -> list[int]:
    """Inverse of `words_to_raw`: one unsigned number as `count` register words on the wire."""
    data = raw.to_bytes(2 * count, "big")
    byte_order: Literal["big", "little"] = "big" if encoding.byte_order == "big" else "little"
    words = [int.from_bytes(data[i : i + 2], byte_order) for i in range(0, 2 * count, 2)]
    if encoding.word_order == "little":
        words.reverse()
    return words


def _typed(raw: int, vtype: ValueType) -> int | float:
    bits = 16 * vtype.register_count
    if vtype is ValueType.FLOAT32:
        return float(struct.unpack(">f", raw.to_bytes(4, "big"))[0])
    if vtype is ValueType.FLOAT64:
        return float(struct.unpack(">d", raw.to_bytes(8, "big"))[0])
    if vtype.is_signed and raw >= 1 << (bits - 1):
        return raw - (1 << bits)
    return raw


def _untyped(value: int | float, vtype: ValueType) -> int:
    bits = 16 * vtype.register_count
    if vtype is ValueType.FLOAT32:
        return int.from_bytes(struct.pack(">f", value), "big")
    if vtype is ValueType.FLOAT64:
        return int.from_bytes(struct.pack(">d", value), "big")
    if not isinstance(value, int):
        raise EncodeError(f"{vtype.value} takes an integer, got {value!r}")
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if vtype.is_signed else (0, (1 << bits) - 1)
    if not lo <= value <= hi:
        raise EncodeError(f"{value} does not fit {vtype.value} [{lo}, {hi}]")
    return value & ((1 << bits) - 1)


def float32_decimal(value: float) -> Decimal:
    """The shortest decimal that reads back as the same float32 (numpy prints float32 that way)."""
    return Decimal(str(np.float32(value)))


@dataclass(frozen=True, slots=True)
class RawValue:
    """A field's typed raw value, or why there is none."""

    value: int | float | None
    quality: Quality = Quality.OK
    detail: str = ""


def read_field(f: Field, image: RegisterImage) -> RawValue:
    """A field's typed raw value from the image, with sentinels, NaN and failed reads flagged."""
    words = image.get(f.function, f.address, f.count)
    if words is None:
        failure = image.failure_for(f.function, f.address, f.count)
        if failure is not None:
            return RawValue(None, failure.quality, failure.detail)
        return RawValue(None, Quality.NO_DATA, f"fc{f.function} {f.address}+{f.count} not read")
    raw = words_to_raw(words, f.encoding)
    if raw in f.sentinels:
        return RawValue(None, Quality.NOT_IMPLEMENTED, f"sentinel 0x{raw:0{4 * f.count}X}")
    typed = _typed(raw, f.type)
    if isinstance(typed, float) and not math.isfinite(typed):
        return RawValue(None, Quality.NAN, f"float register holds {typed}")
    return RawValue(typed)


def _exact(value: int | float, vtype: ValueType) -> Decimal:
    if isinstance(value, int):
        return Decimal(value)
    if vtype is ValueType.FLOAT32:
        return float32_decimal(value)
    return Decimal(repr(value))


def _canonical(quantity: Quantity, value: Decimal) -> Number:
    if QUANTITIES[quantity.name].integer:
        return int(value.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    return float(value)


def decode_quantity(rmap: RegisterMap, quantity: Quantity, image: RegisterImage) -> QuantityValue:
    """One quantity in canonical units, or invalid with its reason."""
    if quantity.unusable_reason:
        return QuantityValue.invalid(Quality.UNKNOWN_CONFIG, quantity.unusable_reason)
    raw = read_field(quantity.field, image)
    if raw.value is None:
        return QuantityValue.invalid(raw.quality, raw.detail)
    exponent = 0
    if quantity.scale_factor is not None:
        sf = read_field(rmap.scale_factors[quantity.scale_factor], image)
        if sf.value is None or not isinstance(sf.value, int) or not -10 <= sf.value <= 10:
            detail = sf.detail or f"{quantity.scale_factor} = {sf.value} is outside -10..10"
            return QuantityValue.invalid(Quality.INVALID_SCALE_FACTOR, detail)
        exponent = sf.value
    value = _exact(raw.value, quantity.field.type) * quantity.scale * quantity.sign
    if exponent:
        value = value.scaleb(exponent)
    return QuantityValue(_canonical(quantity, value))


def decode(
    rmap: RegisterMap, image: RegisterImage, names: Iterable[str] | None = None
) -> dict[str, QuantityValue]:
    """Every quantity of the map (or those in `names`) in canonical units, each valid or flagged."""
    wanted = rmap.quantities if names is None else {n: rmap.quantities[n] for n in names}
    return {name: decode_quantity(rmap, quantity, image) for name, quantity in wanted.items()}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True, slots=True)
class Configured:
    """A map adjusted to what its configuration registers say, with a note per register."""

    map: RegisterMap
    notes: tuple[str, ...]


def configure(rmap: RegisterMap, image: RegisterImage) -> Configured:
    """Apply the configuration registers found in `image`; registers not read keep the map's defaults.

    Word order markers go first: the other configuration registers are floats
    too and must be read in the order the meter actually uses.
    """
    quantities = dict(rmap.quantities)
    notes: list[str] = []
    float_order: str | None = None
    ordered = sorted(rmap.config_registers, key=lambda c: c.effect is not ConfigEffect.WORD_ORDER)
    for config in ordered:
        if config.effect is ConfigEffect.WORD_ORDER:
            order = detect_word_order(config.field, image, config.marker)
            if order is None:
                notes.append(f"{config.name}: marker {config.marker} not found; map word order kept")
                continue
            float_order = order
            for name in config.applies_to:
                q = quantities[name]
                quantities[name] = replace(q, field=_with_word_order(q.field, order))
            notes.append(f"{config.name}: float word order is {order}")
            continue
        f = config.field
        if float_order is not None and f.type.is_float:
            f = _with_word_order(f, float_order)
        raw = read_field(f, image)
        if raw.value is None:
            notes.append(f"{config.name}: {raw.quality.value} ({raw.detail}); map defaults kept")
            continue
        key = int(raw.value) if float(raw.value).is_integer() else None
        scale = None if key is None else config.values.get(key)
        if scale is None:
            reason = f"{config.name} = {raw.value} is not a known setting {sorted(config.values)}"
            for name in config.applies_to:
                quantities[name] = replace(quantities[name], unusable_reason=reason)
            notes.append(reason)
            continue
        for name in config.applies_to:
            quantities[name] = replace(quantities[name], scale=scale)
        notes.append(f"{config.name} = {key}: scale {scale} for {', '.join(config.applies_to)}")
    return Configured(replace(rmap, quantities=quantities), tuple(notes))


def _with_word_order(f: Field, order: str) -> Field:
    word_order: Literal["big", "little"] = "little" if order == "little" else "big"
    return replace(f, encoding=replace(f.encoding, word_order=word_order))


def detect_word_order(f: Field, image: RegisterImage, marker: float | None) -> str | None:
    """Which word order makes the marker register read back as the marker value, if any."""
    words = image.get(f.function, f.address, f.count)
    if words is None or marker is None:
        return None
    for order in ("big", "little"):
        value = _typed(words_to_raw(words, _with_word_order(f, order).encoding), f.type)
        if value == marker:
            return order
    return None


# --------------------------------------------------------------------------- encoding


def encode_raw(f: Field, value: int | float) -> list[int]:
    """The register words for a typed raw value (int, or float for float types)."""
    return raw_to_words(_untyped(value, f.type), f.count, f.encoding)


def sentinel_words(f: Field) -> list[int] | None:
    """The words of the field's first "not implemented" sentinel, or NaN for floats without one."""
    if f.sentinels:
        return raw_to_words(min(f.sentinels), f.count, f.encoding)
    if f.type.is_float:
        return encode_raw(f, math.nan)
    return None


def encode_quantity(quantity: Quantity, value: Number, scale_factor: int = 0) -> list[int]:
    """Register words holding `value` (canonical units) the way the meter would store it."""
    raw = Decimal(repr(value)) if isinstance(value, float) else Decimal(value)
    raw = raw.scaleb(-scale_factor) / (quantity.scale * quantity.sign)
    vtype = quantity.field.type
    if vtype.is_float:
        return encode_raw(quantity.field, float(raw))
    whole = int(raw.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    words = encode_raw(quantity.field, whole)
    if words_to_raw(words, quantity.field.encoding) in quantity.field.sentinels:
        raise EncodeError(f"{quantity.name} = {value} collides with a sentinel")
    return words


def scale_factor_for(
    rmap: RegisterMap, sf_name: str, largest_by_unit: Mapping[str, float] | None = None
) -> int:
    """The smallest power-of-ten exponent at which every quantity using `sf_name` fits its type.

    Magnitudes come from the quantities' plausible ranges, capped per unit by
    `largest_by_unit` (a household meter never sees the 3 MW a range allows).
    """
    caps = largest_by_unit or {}
    exponent = -10
    for quantity in rmap.quantities.values():
        if quantity.scale_factor != sf_name or quantity.range is None:
            continue
        bits = 16 * quantity.field.type.register_count
        limit = (1 << (bits - 1)) - 1 if quantity.field.type.is_signed else (1 << bits) - 2
        magnitude = max(abs(quantity.range[0]), abs(quantity.range[1]))
        magnitude = min(magnitude, caps.get(quantity.unit, magnitude))
        largest = Decimal(repr(magnitude)) / quantity.scale
        e = -10
        while e < 10 and largest.scaleb(-e) > limit:
            e += 1
        exponent = max(exponent, e)
    # Whole units at least for energy, and no finer than the map's own resolution needs.
    return max(exponent, -3)


def encode_values(
    rmap: RegisterMap,
    values: Mapping[str, Number | None],
    scale_factors: Mapping[str, int] | None = None,
) -> list[RegisterBlock]:
    """Register blocks for canonical values (None → sentinel or NaN), scale factors included."""
    factors = dict(scale_factors or {})
    for name in rmap.scale_factors:
        factors.setdefault(name, scale_factor_for(rmap, name))
    blocks: list[RegisterBlock] = []
    for name, f in rmap.scale_factors.items():
        blocks.append(RegisterBlock(f.function, f.address, tuple(encode_raw(f, factors[name]))))
    for name, value in values.items():
        quantity = rmap.quantities[name]
        if value is None:
            words = sentinel_words(quantity.field)
            if words is None:
                raise EncodeError(f"{name} has no sentinel and is not a float: cannot mark it invalid")
        else:
            exponent = 0 if quantity.scale_factor is None else factors[quantity.scale_factor]
            words = encode_quantity(quantity, value, exponent)
        blocks.append(RegisterBlock(quantity.field.function, quantity.field.address, tuple(words)))
    return blocks
