"""Shipped register maps validate and decode their own test vectors; the codec flags, never zeroes."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from services.meter_ingest.domain.codec import (
    EncodeError,
    RegisterImage,
    configure,
    decode,
    encode_raw,
    encode_values,
    float32_decimal,
    read_field,
    sentinel_words,
    words_to_raw,
)
from services.meter_ingest.domain.quantities import Quality
from services.meter_ingest.domain.register_map import (
    Encoding,
    Field,
    RegisterMap,
    RegisterMapError,
    ValueType,
    parse_register_map,
)
from services.meter_ingest.domain.sunspec import run_discovery
from services.meter_ingest.maps import load_register_map, shipped_map_paths

REQUIRED_MODELS = {
    "eastron_sdm630_v2",
    "eastron_sdm120",
    "carlo_gavazzi_em340",
    "abb_b2x",
    "janitza_umg96rm_e",
    "sunspec_meter_203",
    "sunspec_meter_213",
}
MAP_PATHS = shipped_map_paths()


def _decode_vector(rmap: RegisterMap, image: RegisterImage) -> dict[str, Any]:
    if rmap.sunspec is not None:
        location = run_discovery(rmap.sunspec, lambda r: image.get(r.function, r.address, r.count))
        rmap = rmap.anchored_at(location.address)
    return decode(configure(rmap, image).map, image)


def test_every_required_meter_model_ships_a_map() -> None:
    assert {path.stem for path in MAP_PATHS} >= REQUIRED_MODELS


@pytest.mark.parametrize("path", MAP_PATHS, ids=[p.stem for p in MAP_PATHS])
def test_a_shipped_map_decodes_each_of_its_test_vectors_to_the_expected_values(path: Path) -> None:
    rmap = load_register_map(path)
    assert rmap.id == path.stem
    assert rmap.sources and rmap.verification.status
    for vector in rmap.test_vectors:
        values = _decode_vector(rmap, RegisterImage.from_blocks(vector.blocks))
        for name, expected in vector.expect.items():
            got = values[name]
            assert got.ok, f"{vector.name}: {name} is {got}"
            if isinstance(expected, int) and not isinstance(expected, bool):
                assert got.value == expected and isinstance(got.value, int), (vector.name, name, got)
            else:
                assert got.value == pytest.approx(expected, rel=1e-9), (vector.name, name, got)
        for name, quality in vector.expect_invalid.items():
            assert values[name].quality is quality and values[name].value is None, (vector.name, name)


@pytest.mark.parametrize("path", MAP_PATHS, ids=[p.stem for p in MAP_PATHS])
def test_a_shipped_map_has_energy_power_voltage_current_and_frequency(path: Path) -> None:
    rmap = load_register_map(path)
    for name in (
        "energy_import_wh",
        "energy_export_wh",
        "power_w",
        "voltage_l1_v",
        "current_l1_a",
        "frequency_hz",
    ):
        assert name in rmap.quantities, name
    assert rmap.quantities["energy_import_wh"].counter is not None


def _minimal_map(**overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": "p2pgrid.meter-map.v1",
        "id": "test_meter",
        "manufacturer": "Test",
        "models": ["T1"],
        "sources": [{"title": "none"}],
        "verification": {"status": "unverified"},
        "transport": {"unit_id": 1},
        "encoding": {"byte_order": "big", "word_order": "big"},
        "quantities": {"power_w": {"function": 4, "address": 0, "type": "int16", "unit": "W"}},
        "test_vectors": [
            {"registers": [{"function": 4, "address": 0, "words": [5]}], "expect": {"power_w": 5}}
        ],
    }
    doc.update(overrides)
    return doc


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (
            {"quantities": {"power_kw": {"function": 4, "address": 0, "type": "int16", "unit": "W"}}},
            "power_kw",
        ),
        (
            {"quantities": {"power_w": {"function": 5, "address": 0, "type": "int16", "unit": "W"}}},
            "function",
        ),
        (
            {"quantities": {"power_w": {"function": 4, "address": 0, "type": "float33", "unit": "W"}}},
            "float33",
        ),
        ({"quantities": {"power_w": {"function": 4, "address": 0, "type": "int16", "unit": "kW"}}}, "unit"),
        ({"quantities": {"power_w": {"function": 4, "offset": 0, "type": "int16", "unit": "W"}}}, "offset"),
        ({"transport": {"unit_id": 1, "alignment": 2, "max_registers_per_request": 79}}, "alignment"),
        ({"transport": {"unit_id": 1, "max_registers_per_request": 126}}, "max_registers_per_request"),
        ({"test_vectors": []}, "test_vectors"),
        ({"verification": {"status": "trust me"}}, "verification.status"),
        ({"colour": "red"}, "colour"),
    ],
)
def test_a_map_that_breaks_the_schema_is_rejected_naming_the_field(
    override: dict[str, Any], message: str
) -> None:
    with pytest.raises(RegisterMapError, match=message):
        parse_register_map(_minimal_map(**override), origin="bad.yaml")


def test_a_missing_map_file_is_a_precise_error(tmp_path: Path) -> None:
    with pytest.raises(RegisterMapError, match="cannot read"):
        load_register_map(tmp_path / "nope.yaml")
    (tmp_path / "broken.yaml").write_text("quantities: [", encoding="utf-8")
    with pytest.raises(RegisterMapError, match="not valid YAML"):
        load_register_map(tmp_path / "broken.yaml")


def test_a_map_file_can_be_named_by_its_bare_model_id() -> None:
    assert load_register_map("eastron_sdm120").id == "eastron_sdm120"


def test_the_readme_documents_every_top_level_key_of_the_schema() -> None:
    readme = (MAP_PATHS[0].parent / "README.md").read_text(encoding="utf-8")
    for key in (
        "schema",
        "transport",
        "encoding",
        "addressing",
        "quantities",
        "config_registers",
        "test_vectors",
    ):
        assert f"`{key}`" in readme, key


def test_each_map_file_is_plain_yaml_with_the_schema_tag() -> None:
    for path in MAP_PATHS:
        assert yaml.safe_load(path.read_text(encoding="utf-8"))["schema"] == "p2pgrid.meter-map.v1"


# --------------------------------------------------------------------------- codec


def _field(
    vtype: ValueType,
    word_order: str = "big",
    byte_order: str = "big",
    sentinels: frozenset[int] = frozenset(),
) -> Field:
    return Field("x", 3, 0, vtype, Encoding(byte_order, word_order), sentinels)  # type: ignore[arg-type]


@given(
    st.sampled_from(list(ValueType)),
    st.sampled_from(["big", "little"]),
    st.sampled_from(["big", "little"]),
    st.data(),
)
def test_any_value_survives_encoding_and_decoding_in_every_order(
    vtype: ValueType, word_order: str, byte_order: str, data: st.DataObject
) -> None:
    f = _field(vtype, word_order, byte_order)
    if vtype.is_float:
        width: Literal[32, 64] = 32 if vtype is ValueType.FLOAT32 else 64
        value: float | int = data.draw(st.floats(allow_nan=False, allow_infinity=False, width=width))
    else:
        bits = 16 * vtype.register_count
        lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if vtype.is_signed else (0, (1 << bits) - 1)
        value = data.draw(st.integers(lo, hi))
    image = RegisterImage()
    image.put(3, 0, encode_raw(f, value))
    assert read_field(f, image).value == value


def test_word_order_little_means_low_word_first_on_the_wire() -> None:
    assert words_to_raw([0x5678, 0x1234], Encoding("big", "little")) == 0x12345678
    assert words_to_raw([0x1234, 0x5678], Encoding("big", "big")) == 0x12345678
    assert words_to_raw([0x3412, 0x7856], Encoding("little", "big")) == 0x12345678


def test_a_float32_reads_as_the_shortest_decimal_the_meter_holds() -> None:
    (stored,) = struct.unpack(">f", struct.pack(">f", 230.4))
    assert stored != 230.4
    assert str(float32_decimal(stored)) == "230.4"


@pytest.mark.parametrize("words", [[0x7FC0, 0x0000], [0xFFFF, 0xFFFF], [0x7F80, 0x0000], [0xFF80, 0x0000]])
def test_nan_and_infinity_in_a_float_register_are_flagged_not_zero(words: list[int]) -> None:
    image = RegisterImage()
    image.put(3, 0, words)
    raw = read_field(_field(ValueType.FLOAT32), image)
    assert raw.value is None and raw.quality is Quality.NAN


def test_a_sentinel_is_flagged_not_implemented_even_when_it_is_zero() -> None:
    image = RegisterImage()
    image.put(3, 0, [0, 0])
    raw = read_field(_field(ValueType.ACC32, sentinels=frozenset({0})), image)
    assert raw.value is None and raw.quality is Quality.NOT_IMPLEMENTED


def test_a_failed_read_marks_the_values_inside_it_with_the_failure() -> None:
    rmap = load_register_map("eastron_sdm120")
    image = RegisterImage()
    image.fail(4, 0x0000, 14, Quality.EXCEPTION, "exception 2")
    values = decode(rmap, image)
    assert values["voltage_l1_v"].quality is Quality.EXCEPTION
    assert values["energy_import_wh"].quality is Quality.NO_DATA
    assert all(v.value is None for v in values.values())


def test_an_unknown_energy_unit_setting_makes_the_counters_unusable_not_wrong() -> None:
    rmap = load_register_map("eastron_sdm630_v2")
    image = RegisterImage.from_blocks(rmap.test_vectors[0].blocks)
    image.put(3, 0x001E, encode_raw(rmap.config_registers[0].field, 7.0))
    values = decode(configure(rmap, image).map, image)
    assert values["energy_import_wh"].quality is Quality.UNKNOWN_CONFIG
    assert values["power_w"].ok


@pytest.mark.parametrize("path", MAP_PATHS, ids=[p.stem for p in MAP_PATHS])
def test_encoding_plausible_values_with_a_map_decodes_back_to_them(path: Path) -> None:
    rmap = load_register_map(path)
    if rmap.sunspec is not None:
        rmap = rmap.anchored_at(40069)
    sample = {
        "energy_import_wh": 12_345_600,
        "energy_export_wh": 7_654_300,
        "power_w": -2_500,
        "voltage_l1_v": 230.1,
        "current_l1_a": 12.0,
        "frequency_hz": 50.0,
    }
    image = RegisterImage.from_blocks(encode_values(rmap, sample))
    values = decode(rmap, image, sample)
    for name, expected in sample.items():
        assert values[name].ok, (name, values[name])
        assert values[name].value == pytest.approx(expected, rel=1e-6, abs=1e-9), name
    if sentinel_words(rmap.quantities["power_w"].field) is None:
        with pytest.raises(EncodeError, match="no sentinel"):
            encode_values(rmap, {"power_w": None})
        return
    invalid = decode(rmap, RegisterImage.from_blocks(encode_values(rmap, {"power_w": None})), ["power_w"])
    assert invalid["power_w"].value is None
    assert invalid["power_w"].quality in (Quality.NAN, Quality.NOT_IMPLEMENTED)
