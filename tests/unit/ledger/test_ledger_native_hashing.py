"""The compiled hashing module gives exactly the bytes of its Python twins, with either SHA-256 implementation."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.ledger.adapters import sql
from services.ledger.domain import chain, hashing
from services.ledger.domain.chain import chain_heads, leaf_hashes

native: Any = pytest.importorskip("services.ledger._native") if hashing.NATIVE else None

IMPLEMENTATIONS = ["portable C", "SHA extensions"]


@pytest.fixture(params=IMPLEMENTATIONS)
def implementation(request: pytest.FixtureRequest) -> Iterator[str]:
    """Each SHA-256 implementation of the compiled module in turn (skipped where the CPU has none)."""
    assert native is not None
    before = hashing.NATIVE
    try:
        native.use_implementation(request.param)
    except ValueError:
        pytest.skip(f"this CPU has no {request.param} implementation")
    try:
        yield request.param
    finally:
        native.use_implementation(before)


def test_the_project_install_builds_the_compiled_hashing_module() -> None:
    assert hashing.NATIVE in IMPLEMENTATIONS, (
        "services.ledger._native was not built: `make setup` needs a C compiler and Python's headers"
    )


pytestmark_native = pytest.mark.skipif(native is None, reason="the compiled module is not built")


@pytestmark_native
def test_sha256_matches_hashlib_for_every_length_across_block_boundaries(implementation: str) -> None:
    data = bytes((i * 131 + 7) % 256 for i in range(1100))
    for length in [*range(0, 300), 1000, 1024, 1100]:
        assert native.sha256(data[:length]) == hashlib.sha256(data[:length]).digest(), length


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=300)  # what UTF-8 can encode
fields = st.one_of(
    text,
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
)
transfers = st.lists(st.tuples(*[fields] * 8), max_size=40)


@pytestmark_native
@settings(max_examples=150, deadline=None)
@given(transfers=transfers, previous=st.binary(min_size=32, max_size=32))
def test_entry_and_chained_hashes_equal_the_python_ones_for_any_text_and_64_bit_integers(
    transfers: list[tuple[Any, ...]], previous: bytes
) -> None:
    leaves = leaf_hashes(transfers)  # type: ignore[arg-type]
    heads = chain_heads(previous, leaves)
    for name in IMPLEMENTATIONS:
        try:
            native.use_implementation(name)
        except ValueError:
            continue
        assert native.leaves_and_heads(transfers, previous) == (b"".join(leaves), b"".join(heads))
    native.use_implementation(hashing.NATIVE)
    assert chain.leaves_and_heads(transfers, previous) == (b"".join(leaves), b"".join(heads))


def test_fields_the_compiled_module_does_not_write_fall_back_to_python() -> None:
    odd = [("t", "a", "b", True, "c", 2**70, "", -(2**64))]
    expected = chain.python_leaves_and_heads(odd, bytes(32))
    assert chain.leaves_and_heads(odd, bytes(32)) == expected
    assert (
        expected[0]
        == hashlib.sha256(
            b"\x00p2pgrid-transfer-v1|t|a|b|True|c|" + str(2**70).encode() + b"||-" + str(2**64).encode()
        ).digest()
    )


@pytestmark_native
def test_a_previous_chained_hash_that_is_not_32_bytes_is_refused() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        native.leaves_and_heads([], bytes(31))
    with pytest.raises(TypeError, match="8 fields"):
        native.leaves_and_heads([("a",) * 7], bytes(32))


@pytestmark_native
@settings(max_examples=60, deadline=None)
@given(count=st.integers(min_value=0, max_value=70), seed=st.binary(min_size=1, max_size=8))
def test_merkle_levels_equal_the_python_ones_and_leave_an_odd_last_node_out(count: int, seed: bytes) -> None:
    nodes = b"".join(hashlib.sha256(seed + i.to_bytes(2, "big")).digest() for i in range(count))
    expected = hashing.python_pair_up_level(nodes)
    assert len(expected) == 32 * (count // 2)
    assert native.pair_up(nodes) == expected


def test_a_merkle_level_that_is_not_whole_hashes_is_refused_by_both() -> None:
    with pytest.raises(ValueError, match="32-byte"):
        hashing.python_pair_up_level(bytes(33))
    if native is not None:
        with pytest.raises(ValueError, match="32-byte"):
            native.pair_up(bytes(33))


@pytestmark_native
@settings(max_examples=100, deadline=None)
@given(messages=st.lists(text, max_size=30), digits=st.integers(min_value=0, max_value=64))
def test_short_hex_digests_equal_hashlibs_hexdigest_prefix(messages: list[str], digits: int) -> None:
    expected = [hashlib.sha256(m.encode()).hexdigest()[:digits] for m in messages]
    assert native.short_hex_digests(messages, digits) == expected
    assert hashing.python_short_hex_digests(messages, digits) == expected


@pytestmark_native
def test_short_hex_digests_refuse_what_is_not_text_or_too_many_digits() -> None:
    with pytest.raises(TypeError, match="str"):
        native.short_hex_digests([b"bytes"], 30)
    with pytest.raises(ValueError, match="between 0 and 64"):
        native.short_hex_digests([], 65)
    with pytest.raises(ValueError, match="between 0 and 64"):
        hashing.python_short_hex_digests([], 65)


@pytestmark_native
@settings(max_examples=100, deadline=None)
@given(
    rows=st.lists(
        st.tuples(
            st.sampled_from("abcd"), st.sampled_from("cdef"), st.integers(min_value=1, max_value=2**70)
        ),
        max_size=40,
    ),
    start=st.dictionaries(st.sampled_from("abcdef"), st.integers(min_value=0, max_value=2**64)),
)
def test_account_sums_add_every_amount_to_its_debit_and_credit_account_exactly(
    rows: list[tuple[str, str, int]], start: dict[str, int]
) -> None:
    transfers = [("id", debit, credit, amount, "code", 0, "", 0) for debit, credit, amount in rows]
    debited, credited = dict(start), dict(start)
    native.add_totals(transfers, debited, credited)
    expected_debited, expected_credited = dict(start), dict(start)
    for _id, debit, credit, amount, *_rest in transfers:
        expected_debited[debit] = expected_debited.get(debit, 0) + amount
        expected_credited[credit] = expected_credited.get(credit, 0) + amount
    assert (debited, credited) == (expected_debited, expected_credited)


@pytestmark_native
def test_account_sums_refuse_a_row_that_is_not_a_transfer_tuple() -> None:
    with pytest.raises(TypeError, match="at least 4 fields"):
        native.add_totals([("id", "a", "b")], {}, {})


@pytestmark_native
@settings(max_examples=100, deadline=None)
@given(transfers=transfers, first_seq=st.integers(min_value=1, max_value=2**62))
def test_copy_rows_equal_the_python_ones_line_for_line(
    transfers: list[tuple[Any, ...]], first_seq: int
) -> None:
    expected = sql.python_copy_rows(first_seq, transfers)
    assert native.copy_rows(first_seq, transfers) == expected
    assert sql.copy_rows(first_seq, transfers) == expected
    assert expected.count(b"\n") >= len(transfers)


def test_copy_rows_write_fields_the_compiled_module_does_not_as_python_does() -> None:
    rows = sql.copy_rows(7, [("t", "a", "b", True, "c", 2**70, "", 1)])
    assert rows == f"7\tt\ta\tb\tTrue\tc\t{2**70}\t\t1\n".encode()


json_leaves = st.one_of(
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.integers(min_value=2**63, max_value=2**80),
    st.text(max_size=20),
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),
    st.floats(allow_nan=False),
    st.none(),
)
json_documents = st.recursive(
    json_leaves,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.tuples(inner, inner),
        st.dictionaries(
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8), inner, max_size=5
        ),
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(document=json_documents)
def test_compact_json_writes_exactly_what_the_json_module_writes(document: object) -> None:
    assert hashing.compact_json(document) == json.dumps(document, separators=(",", ":")).encode()


@pytestmark_native
def test_plain_json_refuses_what_needs_escaping_or_is_not_a_plain_value() -> None:
    for value in ['say "hi"', "back\\slash", "tab\t", "é", 2**64, 1.5, None, {1: 2}, {"a"}]:
        with pytest.raises(ValueError):
            native.plain_json([value])
    assert (
        native.plain_json({"a": [1, True, (False, "x y")], "b": {}}) == b'{"a":[1,true,[false,"x y"]],"b":{}}'
    )


@pytestmark_native
def test_row_checks_answer_false_for_rows_they_cannot_read_and_leave_no_error_behind() -> None:
    unreadable: list[Any] = [[object()], [], [], {}, 1, None, None]
    assert native.settlement_rows_pass(*unreadable) is False
    unhashable_node = [("a", ["n1"], "b", "n1", 5)]
    assert native.settlement_rows_pass(unhashable_node, [], [], {"n1": 1}, 10, None, None) is False
