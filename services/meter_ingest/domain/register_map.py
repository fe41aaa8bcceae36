"""Register maps as data: the typed model of a `hw/meters/*.yaml` file and its validating parser.

A register map says, for one meter model, where each canonical quantity
lives on the wire (function code, 0-based address, type, word and byte
order), how to turn the raw value into canonical units (scale, SunSpec scale
factor, sign), which raw values mean "not implemented", what range is
plausible, how its energy counters behave, which configuration registers
change the meaning of other registers, and test vectors that pin it all down.
`parse_register_map` turns the YAML document into a `RegisterMap` or raises
`RegisterMapError` naming the field and the rule it broke.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from dataclasses import field as dc_field
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from typing import Any, Literal

from services.meter_ingest.domain.quantities import QUANTITIES, Kind, Quality

SCHEMA = "p2pgrid.meter-map.v1"
MAX_REGISTERS_PER_READ = 125  # Modbus limit for functions 03 and 04
READ_FUNCTIONS = (3, 4)


class RegisterMapError(ValueError):
    """A register map that breaks the schema; the message names the file, the field and the rule."""


class ValueType(StrEnum):
    """Register value types. SunSpec types keep their own names because their sentinels differ."""

    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    # SunSpec accumulators: unsigned, roll over, 0 means "not implemented".
    ACC32 = "acc32"
    ACC64 = "acc64"
    # SunSpec scale factor: int16 power of ten, 0x8000 means "not implemented".
    SUNSSF = "sunssf"

    @property
    def register_count(self) -> int:
        return _TYPE_REGISTERS[self]

    @property
    def is_float(self) -> bool:
        return self in (ValueType.FLOAT32, ValueType.FLOAT64)

    @property
    def is_signed(self) -> bool:
        return self in (ValueType.INT16, ValueType.INT32, ValueType.INT64, ValueType.SUNSSF)


_TYPE_REGISTERS: dict[ValueType, int] = {
    ValueType.INT16: 1,
    ValueType.UINT16: 1,
    ValueType.INT32: 2,
    ValueType.UINT32: 2,
    ValueType.INT64: 4,
    ValueType.UINT64: 4,
    ValueType.FLOAT32: 2,
    ValueType.FLOAT64: 4,
    ValueType.ACC32: 2,
    ValueType.ACC64: 4,
    ValueType.SUNSSF: 1,
}

Order = Literal["big", "little"]


@dataclass(frozen=True, slots=True)
class Encoding:
    """Byte order inside each 16-bit register and word order across registers of one value."""

    byte_order: Order = "big"
    word_order: Order = "big"


@dataclass(frozen=True, slots=True)
class Field:
    """One value on the wire: where it is, its type and encoding, and its "not implemented" raw values."""

    name: str
    function: int
    address: int
    type: ValueType
    encoding: Encoding
    sentinels: frozenset[int] = frozenset()

    @property
    def count(self) -> int:
        return self.type.register_count

    @property
    def end(self) -> int:
        return self.address + self.count


@dataclass(frozen=True, slots=True)
class CounterSpec:
    """How an energy counter behaves: resets over Modbus, rollover, the fastest plausible rise."""

    resettable: bool = True
    rollover_wh: int | None = None
    max_rate_w: int | None = None
    notes: str = ""


@dataclass(frozen=True, slots=True)
class Quantity:
    """A canonical quantity as this meter model provides it."""

    field: Field
    unit: str
    scale: Decimal = Decimal(1)
    scale_factor: str | None = None
    sign: int = 1
    range: tuple[float, float] | None = None
    counter: CounterSpec | None = None
    source_unit: str = ""
    notes: str = ""
    # Set when a configuration register holds a value the map does not know.
    unusable_reason: str = ""

    @property
    def name(self) -> str:
        return self.field.name


class ConfigEffect(StrEnum):
    """What a configuration register changes."""

    # The register's value selects the scale of the quantities it applies to.
    SCALE = "scale"
    # The register holds a known marker; the word order it reads back in is the meter's float word order.
    WORD_ORDER = "word_order"


@dataclass(frozen=True, slots=True)
class ConfigRegister:
    """A configuration register whose value changes how other registers must be read."""

    field: Field
    effect: ConfigEffect
    applies_to: tuple[str, ...]
    values: Mapping[int, Decimal] = dc_field(default_factory=dict)
    marker: float | None = None
    verification: str = "unverified"
    notes: str = ""

    @property
    def name(self) -> str:
        return self.field.name


@dataclass(frozen=True, slots=True)
class SunSpecAddressing:
    """Addresses are offsets from a SunSpec model header found by discovery ("SunS" marker)."""

    model_ids: tuple[int, ...]
    base_addresses: tuple[int, ...] = (40000, 0, 50000)
    model_lengths: Mapping[int, int] = dc_field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class SerialSettings:
    """RS-485 line settings the meter ships with."""

    baudrate: int = 9600
    parity: Literal["N", "E", "O"] = "N"
    bytesize: int = 8
    stopbits: int = 1


@dataclass(frozen=True, slots=True)
class Transport:
    """How to talk to the meter: default unit id, line settings and the shape of allowed reads."""

    unit_id: int = 1
    unit_ids: tuple[int, ...] = ()
    tcp_port: int = 502
    serial: SerialSettings | None = None
    max_registers_per_request: int = MAX_REGISTERS_PER_READ
    alignment: int = 1
    max_gap_registers: int = 0
    timeout_s: float = 1.0
    inter_request_gap_s: float = 0.0


@dataclass(frozen=True, slots=True)
class RegisterBlock:
    """Consecutive raw register words of one function code, starting at `address`."""

    function: int
    address: int
    words: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class TestVector:
    """Raw registers as a meter serves them and the canonical values they must decode to."""

    name: str
    blocks: tuple[RegisterBlock, ...]
    expect: Mapping[str, int | float]
    expect_invalid: Mapping[str, Quality]
    unit_id: int | None = None

    __test__ = False  # not a pytest test class despite the name


@dataclass(frozen=True, slots=True)
class Source:
    title: str
    url: str = ""


@dataclass(frozen=True, slots=True)
class Verification:
    """How far the map has been checked: against hardware, the maker's document, community code, or not."""

    status: Literal["hardware_tested", "documented", "community", "unverified"]
    notes: str = ""


@dataclass(frozen=True, slots=True)
class RegisterMap:
    """Everything needed to read one meter model and decode it to canonical quantities."""

    id: str
    manufacturer: str
    models: tuple[str, ...]
    phases: int
    sources: tuple[Source, ...]
    verification: Verification
    transport: Transport
    encoding: Encoding
    quantities: Mapping[str, Quantity]
    scale_factors: Mapping[str, Field] = dc_field(default_factory=dict)
    config_registers: tuple[ConfigRegister, ...] = ()
    sunspec: SunSpecAddressing | None = None
    test_vectors: tuple[TestVector, ...] = ()
    description: str = ""
    origin: str = ""

    @property
    def needs_discovery(self) -> bool:
        """True while addresses are still SunSpec offsets that discovery must anchor."""
        return self.sunspec is not None

    def data_fields(self, names: Sequence[str] | None = None) -> list[Field]:
        """The fields to read for `names` (all quantities by default), scale factors included."""
        wanted = list(self.quantities) if names is None else list(names)
        fields: list[Field] = []
        factors: set[str] = set()
        for name in wanted:
            quantity = self.quantities.get(name)
            if quantity is None:
                continue
            fields.append(quantity.field)
            if quantity.scale_factor is not None:
                factors.add(quantity.scale_factor)
        fields.extend(self.scale_factors[name] for name in sorted(factors))
        return fields

    def config_fields(self) -> list[Field]:
        return [config.field for config in self.config_registers]

    def anchored_at(self, model_address: int) -> RegisterMap:
        """The map with SunSpec offsets turned into absolute addresses from a discovered model header."""
        if self.sunspec is None:
            raise RegisterMapError(f"{self.id}: anchored_at needs a SunSpec map")

        def move(f: Field) -> Field:
            return replace(f, address=model_address + f.address)

        return replace(
            self,
            sunspec=None,
            quantities={name: replace(q, field=move(q.field)) for name, q in self.quantities.items()},
            scale_factors={name: move(f) for name, f in self.scale_factors.items()},
            config_registers=tuple(replace(c, field=move(c.field)) for c in self.config_registers),
        )


# --------------------------------------------------------------------------- parsing


class _At:
    """A position in the document, for error messages that name the field."""

    def __init__(self, origin: str, path: str = "") -> None:
        self.origin = origin
        self.path = path

    def child(self, key: str | int) -> _At:
        if isinstance(key, int):
            return _At(self.origin, f"{self.path}[{key}]")
        return _At(self.origin, f"{self.path}.{key}" if self.path else key)

    def error(self, rule: str) -> RegisterMapError:
        where = f"{self.origin}: " if self.origin else ""
        return RegisterMapError(f"{where}{self.path or '<document>'}: {rule}")


def _mapping(value: Any, at: _At) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise at.error(f"must be a mapping, got {type(value).__name__}")
    return value


def _known_keys(data: Mapping[str, Any], at: _At, allowed: set[str]) -> None:
    unknown = sorted(str(k) for k in data if k not in allowed)
    if unknown:
        raise at.error(f"unknown key(s) {unknown}; allowed: {sorted(allowed)}")


def _required(data: Mapping[str, Any], key: str, at: _At) -> Any:
    if key not in data or data[key] is None:
        raise at.child(key).error("is required")
    return data[key]


def _str(value: Any, at: _At) -> str:
    if not isinstance(value, str) or not value.strip():
        raise at.error("must be a non-empty string")
    return value


def _int(value: Any, at: _At, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise at.error(f"must be an integer, got {value!r}")
    if lo is not None and value < lo:
        raise at.error(f"must be >= {lo}, got {value}")
    if hi is not None and value > hi:
        raise at.error(f"must be <= {hi}, got {value}")
    return value


def _number(value: Any, at: _At) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise at.error(f"must be a number, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):
        raise at.error("must be finite")
    return float(value)


def _decimal(value: Any, at: _At) -> Decimal:
    if isinstance(value, bool):
        raise at.error(f"must be a number, got {value!r}")
    try:
        # str() keeps 0.1 as the decimal the author wrote, not its binary approximation.
        result = Decimal(str(value)) if isinstance(value, int | float | str) else None
    except InvalidOperation:
        result = None
    if result is None or not result.is_finite() or result == 0:
        raise at.error(f"must be a finite non-zero number, got {value!r}")
    return result


def _order(value: Any, at: _At) -> Order:
    if value == "big":
        return "big"
    if value == "little":
        return "little"
    raise at.error(f"must be 'big' or 'little', got {value!r}")


def _encoding(data: Any, at: _At, default: Encoding) -> Encoding:
    if data is None:
        return default
    body = _mapping(data, at)
    _known_keys(body, at, {"byte_order", "word_order"})
    return Encoding(
        byte_order=_order(body.get("byte_order", default.byte_order), at.child("byte_order")),
        word_order=_order(body.get("word_order", default.word_order), at.child("word_order")),
    )


def _sentinels(value: Any, at: _At, vtype: ValueType) -> frozenset[int]:
    if value is None:
        return frozenset()
    if not isinstance(value, list):
        raise at.error("must be a list of raw integers (the register words read as one unsigned number)")
    limit = 1 << (16 * vtype.register_count)
    return frozenset(_int(v, at.child(i), 0, limit - 1) for i, v in enumerate(value))


_FIELD_KEYS = {"function", "address", "offset", "type", "encoding", "sentinels"}


def _field(name: str, data: Mapping[str, Any], at: _At, encoding: Encoding, sunspec: bool) -> Field:
    function = _int(_required(data, "function", at), at.child("function"))
    if function not in READ_FUNCTIONS:
        raise at.child("function").error(f"must be 3 (holding) or 4 (input), got {function}")
    if sunspec:
        if "address" in data:
            raise at.child("address").error("SunSpec maps give 'offset' from the model header, not 'address'")
        address = _int(_required(data, "offset", at), at.child("offset"), 0, 65535)
    else:
        if "offset" in data:
            raise at.child("offset").error("only SunSpec maps use 'offset'; give the 0-based wire 'address'")
        address = _int(_required(data, "address", at), at.child("address"), 0, 65535)
    raw_type = _required(data, "type", at)
    try:
        vtype = ValueType(raw_type)
    except ValueError:
        raise at.child("type").error(f"{raw_type!r} is not one of {[t.value for t in ValueType]}") from None
    if address + vtype.register_count > 65536:
        raise at.error("value runs past register 65535")
    return Field(
        name=name,
        function=function,
        address=address,
        type=vtype,
        encoding=_encoding(data.get("encoding"), at.child("encoding"), encoding),
        sentinels=_sentinels(data.get("sentinels"), at.child("sentinels"), vtype),
    )


def _counter(data: Any, at: _At) -> CounterSpec:
    body = _mapping(data, at)
    _known_keys(body, at, {"resettable", "rollover_wh", "max_rate_w", "notes"})
    resettable = body.get("resettable", True)
    if not isinstance(resettable, bool):
        raise at.child("resettable").error("must be true or false")
    rollover = body.get("rollover_wh")
    max_rate = body.get("max_rate_w")
    return CounterSpec(
        resettable=resettable,
        rollover_wh=None if rollover is None else _int(rollover, at.child("rollover_wh"), 1),
        max_rate_w=None if max_rate is None else _int(max_rate, at.child("max_rate_w"), 1),
        notes=str(body.get("notes", "")),
    )


def _quantity(
    name: str,
    data: Any,
    at: _At,
    encoding: Encoding,
    sunspec: bool,
    scale_factor_names: set[str],
) -> Quantity:
    spec = QUANTITIES.get(name)
    if spec is None:
        raise at.error(f"unknown quantity; the canonical names are {sorted(QUANTITIES)}")
    body = _mapping(data, at)
    _known_keys(
        body,
        at,
        _FIELD_KEYS | {"unit", "scale", "scale_factor", "sign", "range", "counter", "source_unit", "notes"},
    )
    f = _field(name, body, at, encoding, sunspec)
    if f.type is ValueType.SUNSSF:
        raise at.child("type").error("sunssf is for scale factors, not quantities")
    unit = _str(_required(body, "unit", at), at.child("unit"))
    if unit != spec.unit:
        raise at.child("unit").error(
            f"{name} is in {spec.unit}; set 'scale' so the value comes out in {spec.unit}, got {unit!r}"
        )
    scale_factor = body.get("scale_factor")
    if scale_factor is not None:
        scale_factor = _str(scale_factor, at.child("scale_factor"))
        if scale_factor not in scale_factor_names:
            raise at.child("scale_factor").error(
                f"{scale_factor!r} is not defined under scale_factors ({sorted(scale_factor_names)})"
            )
    sign_text = body.get("sign", "import_positive")
    if sign_text not in ("import_positive", "export_positive"):
        raise at.child("sign").error(f"must be import_positive or export_positive, got {sign_text!r}")
    if sign_text == "export_positive" and spec.kind is Kind.COUNTER:
        raise at.child("sign").error("energy counters are never negative; sign applies to power only")
    value_range: tuple[float, float] | None = None
    if body.get("range") is not None:
        raw_range = body["range"]
        if not isinstance(raw_range, list) or len(raw_range) != 2:
            raise at.child("range").error("must be [min, max]")
        lo = _number(raw_range[0], at.child("range").child(0))
        hi = _number(raw_range[1], at.child("range").child(1))
        if lo >= hi:
            raise at.child("range").error(f"min {lo} must be below max {hi}")
        value_range = (lo, hi)
    counter: CounterSpec | None = None
    if spec.kind is Kind.COUNTER:
        counter = _counter(body.get("counter", {}), at.child("counter"))
    elif "counter" in body:
        raise at.child("counter").error(f"{name} is not an energy counter")
    return Quantity(
        field=f,
        unit=unit,
        scale=_decimal(body.get("scale", 1), at.child("scale")),
        scale_factor=scale_factor,
        sign=1 if sign_text == "import_positive" else -1,
        range=value_range,
        counter=counter,
        source_unit=str(body.get("source_unit", "")),
        notes=str(body.get("notes", "")),
    )


def _config_register(
    name: str, data: Any, at: _At, encoding: Encoding, sunspec: bool, quantities: Mapping[str, Quantity]
) -> ConfigRegister:
    body = _mapping(data, at)
    _known_keys(body, at, _FIELD_KEYS | {"effect", "applies_to", "values", "marker", "verification", "notes"})
    f = _field(name, body, at, encoding, sunspec)
    raw_effect = _required(body, "effect", at)
    try:
        effect = ConfigEffect(raw_effect)
    except ValueError:
        raise at.child("effect").error(
            f"{raw_effect!r} is not one of {[e.value for e in ConfigEffect]}"
        ) from None
    applies_raw = _required(body, "applies_to", at)
    if not isinstance(applies_raw, list) or not applies_raw:
        raise at.child("applies_to").error("must be a non-empty list of quantity names")
    applies_to = tuple(_str(v, at.child("applies_to").child(i)) for i, v in enumerate(applies_raw))
    for i, target in enumerate(applies_to):
        if target not in quantities:
            raise at.child("applies_to").child(i).error(f"{target!r} is not a quantity of this map")
    values: dict[int, Decimal] = {}
    marker: float | None = None
    if effect is ConfigEffect.SCALE:
        raw_values = _mapping(_required(body, "values", at), at.child("values"))
        for key, scale in raw_values.items():
            key_at = at.child("values").child(str(key))
            values[_int(key, key_at)] = _decimal(scale, key_at)
    else:
        if not f.type.is_float:
            raise at.child("type").error("a word order marker is a float register")
        marker = _number(_required(body, "marker", at), at.child("marker"))
        for i, target in enumerate(applies_to):
            if not quantities[target].field.type.is_float:
                raise at.child("applies_to").child(i).error("word order applies to float quantities only")
    verification = str(body.get("verification", "unverified"))
    if verification not in ("hardware_tested", "documented", "community", "unverified"):
        raise at.child("verification").error(f"unknown verification status {verification!r}")
    return ConfigRegister(
        field=f,
        effect=effect,
        applies_to=applies_to,
        values=values,
        marker=marker,
        verification=verification,
        notes=str(body.get("notes", "")),
    )


def _transport(data: Any, at: _At) -> Transport:
    body = _mapping(data, at)
    _known_keys(
        body,
        at,
        {
            "unit_id",
            "unit_ids",
            "tcp_port",
            "serial",
            "max_registers_per_request",
            "alignment",
            "max_gap_registers",
            "timeout_s",
            "inter_request_gap_s",
        },
    )
    serial: SerialSettings | None = None
    if body.get("serial") is not None:
        s_at = at.child("serial")
        s = _mapping(body["serial"], s_at)
        _known_keys(s, s_at, {"baudrate", "parity", "bytesize", "stopbits"})
        parity = s.get("parity", "N")
        if parity not in ("N", "E", "O"):
            raise s_at.child("parity").error(f"must be N, E or O, got {parity!r}")
        serial = SerialSettings(
            baudrate=_int(s.get("baudrate", 9600), s_at.child("baudrate"), 300, 921600),
            parity=parity,
            bytesize=_int(s.get("bytesize", 8), s_at.child("bytesize"), 7, 8),
            stopbits=_int(s.get("stopbits", 1), s_at.child("stopbits"), 1, 2),
        )
    unit_id = _int(_required(body, "unit_id", at), at.child("unit_id"), 0, 247)
    unit_ids_raw = body.get("unit_ids", [])
    if not isinstance(unit_ids_raw, list):
        raise at.child("unit_ids").error("must be a list of unit ids")
    alignment = _int(body.get("alignment", 1), at.child("alignment"), 1, 8)
    max_count = _int(
        body.get("max_registers_per_request", MAX_REGISTERS_PER_READ),
        at.child("max_registers_per_request"),
        1,
        MAX_REGISTERS_PER_READ,
    )
    if max_count % alignment:
        raise at.child("max_registers_per_request").error(
            f"{max_count} is not a multiple of the alignment {alignment}"
        )
    timeout_s = _number(body.get("timeout_s", 1.0), at.child("timeout_s"))
    gap_s = _number(body.get("inter_request_gap_s", 0.0), at.child("inter_request_gap_s"))
    if timeout_s <= 0:
        raise at.child("timeout_s").error("must be positive")
    if gap_s < 0:
        raise at.child("inter_request_gap_s").error("must not be negative")
    return Transport(
        unit_id=unit_id,
        unit_ids=tuple(_int(u, at.child("unit_ids").child(i), 0, 247) for i, u in enumerate(unit_ids_raw)),
        tcp_port=_int(body.get("tcp_port", 502), at.child("tcp_port"), 1, 65535),
        serial=serial,
        max_registers_per_request=max_count,
        alignment=alignment,
        max_gap_registers=_int(body.get("max_gap_registers", 0), at.child("max_gap_registers"), 0, 124),
        timeout_s=timeout_s,
        inter_request_gap_s=gap_s,
    )


def _sunspec(data: Any, at: _At) -> SunSpecAddressing | None:
    body = _mapping(data, at)
    _known_keys(body, at, {"kind", "model_ids", "base_addresses", "model_lengths"})
    kind = body.get("kind", "absolute")
    if kind == "absolute":
        if len(body) > 1:
            raise at.error("absolute addressing takes no further keys")
        return None
    if kind != "sunspec":
        raise at.child("kind").error(f"must be 'absolute' or 'sunspec', got {kind!r}")
    ids_raw = _required(body, "model_ids", at)
    if not isinstance(ids_raw, list) or not ids_raw:
        raise at.child("model_ids").error("must be a non-empty list of SunSpec model ids")
    model_ids = tuple(_int(v, at.child("model_ids").child(i), 1, 65534) for i, v in enumerate(ids_raw))
    bases_raw = body.get("base_addresses", [40000, 0, 50000])
    if not isinstance(bases_raw, list) or not bases_raw:
        raise at.child("base_addresses").error("must be a non-empty list of addresses")
    lengths_raw = _mapping(body.get("model_lengths", {}), at.child("model_lengths"))
    lengths = {
        _int(k, at.child("model_lengths").child(str(k))): _int(
            v, at.child("model_lengths").child(str(k)), 1, 65535
        )
        for k, v in lengths_raw.items()
    }
    return SunSpecAddressing(
        model_ids=model_ids,
        base_addresses=tuple(
            _int(v, at.child("base_addresses").child(i), 0, 65533) for i, v in enumerate(bases_raw)
        ),
        model_lengths=lengths,
    )


def _vector(data: Any, at: _At, quantities: Mapping[str, Quantity], i: int) -> TestVector:
    body = _mapping(data, at)
    _known_keys(body, at, {"name", "unit_id", "registers", "expect", "expect_invalid", "notes"})
    blocks_raw = _required(body, "registers", at)
    if not isinstance(blocks_raw, list) or not blocks_raw:
        raise at.child("registers").error("must be a non-empty list of {function, address, words}")
    blocks: list[RegisterBlock] = []
    for j, block_raw in enumerate(blocks_raw):
        b_at = at.child("registers").child(j)
        block = _mapping(block_raw, b_at)
        _known_keys(block, b_at, {"function", "address", "words"})
        function = _int(_required(block, "function", b_at), b_at.child("function"))
        if function not in READ_FUNCTIONS:
            raise b_at.child("function").error("must be 3 or 4")
        words_raw = _required(block, "words", b_at)
        if not isinstance(words_raw, list) or not words_raw:
            raise b_at.child("words").error("must be a non-empty list of 16-bit words")
        address = _int(_required(block, "address", b_at), b_at.child("address"), 0, 65535)
        words = tuple(_int(w, b_at.child("words").child(k), 0, 0xFFFF) for k, w in enumerate(words_raw))
        if address + len(words) > 65536:
            raise b_at.error("block runs past register 65535")
        blocks.append(RegisterBlock(function, address, words))
    expect_raw = _mapping(body.get("expect", {}), at.child("expect"))
    expect: dict[str, int | float] = {}
    for name, value in expect_raw.items():
        e_at = at.child("expect").child(str(name))
        if name not in quantities:
            raise e_at.error("is not a quantity of this map")
        if QUANTITIES[name].integer:
            expect[name] = _int(value, e_at)
        else:
            expect[name] = _number(value, e_at)
    invalid_raw = _mapping(body.get("expect_invalid", {}), at.child("expect_invalid"))
    expect_invalid: dict[str, Quality] = {}
    for name, quality in invalid_raw.items():
        q_at = at.child("expect_invalid").child(str(name))
        if name not in quantities:
            raise q_at.error("is not a quantity of this map")
        try:
            expect_invalid[name] = Quality(quality)
        except ValueError:
            raise q_at.error(f"{quality!r} is not a quality") from None
        if expect_invalid[name] is Quality.OK:
            raise q_at.error("an invalid value cannot have quality ok")
    if not expect and not expect_invalid:
        raise at.error("a test vector must expect something")
    overlap = set(expect) & set(expect_invalid)
    if overlap:
        raise at.error(f"{sorted(overlap)} both expected and expected invalid")
    unit_id = body.get("unit_id")
    return TestVector(
        name=_str(body.get("name", f"vector {i}"), at.child("name")),
        blocks=tuple(blocks),
        expect=expect,
        expect_invalid=expect_invalid,
        unit_id=None if unit_id is None else _int(unit_id, at.child("unit_id"), 0, 247),
    )


_TOP_KEYS = {
    "schema",
    "id",
    "manufacturer",
    "models",
    "phases",
    "description",
    "sources",
    "verification",
    "transport",
    "encoding",
    "addressing",
    "scale_factors",
    "quantities",
    "config_registers",
    "test_vectors",
}


def parse_register_map(data: Any, *, origin: str = "") -> RegisterMap:
    """Validate a register map document (already parsed from YAML) and build its typed model."""
    at = _At(origin)
    body = _mapping(data, at)
    _known_keys(body, at, _TOP_KEYS)
    schema = body.get("schema")
    if schema != SCHEMA:
        raise at.child("schema").error(f"must be {SCHEMA!r}, got {schema!r}")
    map_id = _str(_required(body, "id", at), at.child("id"))
    if not map_id.replace("_", "").isalnum() or map_id.lower() != map_id:
        raise at.child("id").error("must be lower_snake_case")
    models_raw = _required(body, "models", at)
    if not isinstance(models_raw, list) or not models_raw:
        raise at.child("models").error("must be a non-empty list of model names")
    sources_raw = _required(body, "sources", at)
    if not isinstance(sources_raw, list) or not sources_raw:
        raise at.child("sources").error("must list at least one source")
    sources: list[Source] = []
    for i, s in enumerate(sources_raw):
        s_at = at.child("sources").child(i)
        sm = _mapping(s, s_at)
        _known_keys(sm, s_at, {"title", "url"})
        sources.append(
            Source(_str(_required(sm, "title", s_at), s_at.child("title")), str(sm.get("url", "")))
        )
    v_at = at.child("verification")
    vm = _mapping(_required(body, "verification", at), v_at)
    _known_keys(vm, v_at, {"status", "notes"})
    status = vm.get("status")
    if status not in ("hardware_tested", "documented", "community", "unverified"):
        raise v_at.child("status").error(
            f"must be hardware_tested, documented, community or unverified, got {status!r}"
        )
    verification = Verification(status=status, notes=str(vm.get("notes", "")))
    encoding = _encoding(_required(body, "encoding", at), at.child("encoding"), Encoding())
    sunspec = _sunspec(body.get("addressing", {"kind": "absolute"}), at.child("addressing"))
    is_sunspec = sunspec is not None

    sf_at = at.child("scale_factors")
    scale_factors: dict[str, Field] = {}
    for name, sf_raw in _mapping(body.get("scale_factors", {}), sf_at).items():
        f_at = sf_at.child(str(name))
        sf_body = _mapping(sf_raw, f_at)
        _known_keys(sf_body, f_at, _FIELD_KEYS)
        f = _field(str(name), sf_body, f_at, encoding, is_sunspec)
        if f.type is not ValueType.SUNSSF:
            raise f_at.child("type").error("scale factors have type sunssf")
        if not f.sentinels:
            f = replace(f, sentinels=frozenset({0x8000}))
        scale_factors[str(name)] = f

    q_at = at.child("quantities")
    quantities_raw = _mapping(_required(body, "quantities", at), q_at)
    quantities = {
        str(name): _quantity(str(name), q, q_at.child(str(name)), encoding, is_sunspec, set(scale_factors))
        for name, q in quantities_raw.items()
    }
    if not quantities:
        raise q_at.error("a map needs at least one quantity")

    c_at = at.child("config_registers")
    config = tuple(
        _config_register(str(name), c, c_at.child(str(name)), encoding, is_sunspec, quantities)
        for name, c in _mapping(body.get("config_registers", {}), c_at).items()
    )
    t_at = at.child("test_vectors")
    vectors_raw = _required(body, "test_vectors", at)
    if not isinstance(vectors_raw, list) or not vectors_raw:
        raise t_at.error("a map ships at least one test vector")
    vectors = tuple(_vector(v, t_at.child(i), quantities, i) for i, v in enumerate(vectors_raw))

    phases = _int(body.get("phases", 3), at.child("phases"), 1, 3)
    return RegisterMap(
        id=map_id,
        manufacturer=_str(_required(body, "manufacturer", at), at.child("manufacturer")),
        models=tuple(_str(m, at.child("models").child(i)) for i, m in enumerate(models_raw)),
        phases=phases,
        sources=tuple(sources),
        verification=verification,
        transport=_transport(_required(body, "transport", at), at.child("transport")),
        encoding=encoding,
        quantities=quantities,
        scale_factors=scale_factors,
        config_registers=config,
        sunspec=sunspec,
        test_vectors=vectors,
        description=str(body.get("description", "")),
        origin=origin,
    )
