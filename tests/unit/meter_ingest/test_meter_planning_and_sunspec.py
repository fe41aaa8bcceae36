"""Reads are packed into as few requests as the meter allows; SunSpec discovery walks the model chain."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.meter_ingest.domain.codec import RegisterImage
from services.meter_ingest.domain.planning import PlanError, ReadRequest, plan_reads, split_per_field
from services.meter_ingest.domain.register_map import (
    Encoding,
    Field,
    SunSpecAddressing,
    Transport,
    ValueType,
)
from services.meter_ingest.domain.sunspec import DiscoveryError, run_discovery
from services.meter_ingest.maps import load_register_map


def _f(function: int, address: int, vtype: ValueType = ValueType.FLOAT32) -> Field:
    return Field(f"f{function}_{address}", function, address, vtype, Encoding())


def test_the_sdm630_quantities_are_read_in_one_request() -> None:
    rmap = load_register_map("eastron_sdm630_v2")
    plan = plan_reads(rmap.data_fields(), rmap.transport)
    assert plan == [ReadRequest(4, 0x0000, 0x004C)]
    assert all(r.count <= 80 and r.address % 2 == 0 and r.count % 2 == 0 for r in plan)


def test_config_registers_are_planned_separately_on_holding_registers() -> None:
    rmap = load_register_map("eastron_sdm630_v2")
    plan = plan_reads(rmap.config_fields(), rmap.transport)
    assert plan == [ReadRequest(3, 0x001E, 0x000C)]


def test_function_codes_are_never_mixed_in_one_request() -> None:
    transport = Transport(max_registers_per_request=125, max_gap_registers=100)
    plan = plan_reads([_f(3, 10), _f(4, 12), _f(3, 14)], transport)
    assert plan == [ReadRequest(3, 10, 6), ReadRequest(4, 12, 2)]


def test_a_gap_wider_than_allowed_splits_the_read() -> None:
    transport = Transport(max_registers_per_request=125, max_gap_registers=4)
    plan = plan_reads([_f(3, 0), _f(3, 6), _f(3, 20)], transport)
    assert plan == [ReadRequest(3, 0, 8), ReadRequest(3, 20, 2)]


def test_eastron_alignment_pads_odd_starts_and_counts() -> None:
    transport = Transport(max_registers_per_request=80, alignment=2, max_gap_registers=0)
    plan = plan_reads([_f(4, 3, ValueType.UINT16)], transport)
    assert plan == [ReadRequest(4, 2, 2)]


def test_a_field_that_cannot_fit_any_read_is_a_plan_error() -> None:
    transport = Transport(max_registers_per_request=2, alignment=2)
    with pytest.raises(PlanError, match="cannot be read"):
        plan_reads([_f(4, 1)], transport)


def test_splitting_gives_one_read_per_field() -> None:
    transport = Transport(max_registers_per_request=80, alignment=2, max_gap_registers=40)
    fields = [_f(4, 0), _f(4, 2), _f(4, 10)]
    assert split_per_field(fields, transport) == [
        ReadRequest(4, 0, 2),
        ReadRequest(4, 2, 2),
        ReadRequest(4, 10, 2),
    ]


@st.composite
def _fields_and_transport(draw: st.DrawFn) -> tuple[list[Field], Transport]:
    alignment = draw(st.sampled_from([1, 2]))
    max_count = draw(st.integers(4, 60).map(lambda n: n - n % alignment))
    transport = Transport(
        max_registers_per_request=max_count,
        alignment=alignment,
        max_gap_registers=draw(st.integers(0, 30)),
    )
    types = [ValueType.UINT16, ValueType.FLOAT32, ValueType.UINT64]
    fields = draw(
        st.lists(
            st.builds(
                _f,
                st.sampled_from([3, 4]),
                st.integers(0, 400).map(lambda a: a - a % alignment),
                st.sampled_from(types),
            ),
            min_size=1,
            max_size=25,
        )
    )
    return fields, transport


def _brute_force_minimum(starts_ends: list[tuple[int, int]], transport: Transport) -> int:
    """Fewest reads by dynamic programming over sorted spans (reads cover contiguous runs)."""
    spans = sorted(set(starts_ends))
    a = transport.alignment
    best = [0] + [10**9] * len(spans)
    for j in range(1, len(spans) + 1):
        for i in range(j):
            run = spans[i:j]
            lo = run[0][0] - run[0][0] % a
            hi = max(e for _, e in run)
            hi_aligned = -(-hi // a) * a
            covered_end = run[0][1]
            gaps_ok = True
            for s, e in run[1:]:
                if s - covered_end > transport.max_gap_registers:
                    gaps_ok = False
                covered_end = max(covered_end, e)
            if gaps_ok and hi_aligned - lo <= transport.max_registers_per_request:
                best[j] = min(best[j], best[i] + 1)
    return best[-1]


@given(_fields_and_transport())
def test_a_plan_covers_every_field_within_the_rules_with_the_fewest_reads(
    case: tuple[list[Field], Transport],
) -> None:
    fields, transport = case
    plan = plan_reads(fields, transport)
    for f in fields:
        assert any(r.covers(f) for r in plan), f
    for r in plan:
        assert r.count <= transport.max_registers_per_request
        assert r.address % transport.alignment == 0 and r.count % transport.alignment == 0
    for function in (3, 4):
        spans = [(f.address, f.end) for f in fields if f.function == function]
        if spans:
            assert sum(1 for r in plan if r.function == function) == _brute_force_minimum(spans, transport)


# --------------------------------------------------------------------------- SunSpec


def _chain(base: int, models: Sequence[tuple[int, int]]) -> RegisterImage:
    image = RegisterImage()
    image.put(3, base, [0x5375, 0x6E53])
    address = base + 2
    for model_id, length in models:
        image.put(3, address, [model_id, length])
        address += 2 + length
    image.put(3, address, [0xFFFF, 0])
    return image


def _reader(image: RegisterImage) -> Callable[[ReadRequest], list[int] | None]:
    return lambda r: image.get(r.function, r.address, r.count)


def test_discovery_walks_past_the_common_and_inverter_models_to_the_meter() -> None:
    image = _chain(40000, [(1, 65), (103, 50), (203, 105)])
    location = run_discovery(SunSpecAddressing(model_ids=(203,)), _reader(image))
    assert (location.model_id, location.address, location.length) == (203, 40002 + 67 + 52, 105)


def test_discovery_tries_the_other_base_addresses() -> None:
    image = _chain(0, [(1, 65), (213, 124)])
    location = run_discovery(SunSpecAddressing(model_ids=(213,)), _reader(image))
    assert location.address == 2 + 67


def test_discovery_without_the_wanted_model_names_what_it_found() -> None:
    image = _chain(40000, [(1, 65), (213, 124)])
    with pytest.raises(DiscoveryError, match=r"203.*SunS at 40000 with models \[1, 213\]"):
        run_discovery(SunSpecAddressing(model_ids=(203,)), _reader(image))


def test_discovery_rejects_a_model_with_an_unexpected_length() -> None:
    image = _chain(40000, [(1, 65), (203, 90)])
    with pytest.raises(DiscoveryError, match="length 90"):
        run_discovery(SunSpecAddressing(model_ids=(203,), model_lengths={203: 105}), _reader(image))
