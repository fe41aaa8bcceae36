"""The Merkle tree against RFC 9162's recursive definitions and the Certificate Transparency test vectors."""

from __future__ import annotations

import hashlib
import itertools
import random

import pytest

from services.ledger.domain.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleFrontier,
    ProofError,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    perfect_pieces,
    range_hash,
    root_from_inclusion_proof,
    verify_consistency,
    verify_inclusion,
)

# RFC 6962 / 9162 reference vectors (certificate-transparency test data): leaves and the roots of
# the trees of their first 1..8 entries.
VECTOR_LEAVES = [
    b"",
    b"\x00",
    b"\x10",
    b"\x20\x21",
    b"\x30\x31",
    b"\x40\x41\x42\x43",
    bytes(range(0x50, 0x58)),
    bytes(range(0x60, 0x70)),
]
VECTOR_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _k(n: int) -> int:
    k = 1
    while k * 2 < n:
        k *= 2
    return k


def ref_mth(leaves: list[bytes]) -> bytes:
    """MTH of RFC 9162 §2.1.1, written out independently of the code under test."""
    if not leaves:
        return _h(b"")
    if len(leaves) == 1:
        return _h(b"\x00" + leaves[0])
    k = _k(len(leaves))
    return _h(b"\x01" + ref_mth(leaves[:k]) + ref_mth(leaves[k:]))


def ref_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 §2.1.3.1."""
    if len(leaves) == 1:
        return []
    k = _k(len(leaves))
    if m < k:
        return [*ref_path(m, leaves[:k]), ref_mth(leaves[k:])]
    return [*ref_path(m - k, leaves[k:]), ref_mth(leaves[:k])]


def ref_subproof(m: int, leaves: list[bytes], whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) of RFC 9162 §2.1.4.1."""
    n = len(leaves)
    if m == n:
        return [] if whole else [ref_mth(leaves)]
    k = _k(n)
    if m <= k:
        return [*ref_subproof(m, leaves[:k], whole), ref_mth(leaves[k:])]
    return [*ref_subproof(m - k, leaves[k:], False), ref_mth(leaves[:k])]


def entries(n: int) -> list[bytes]:
    return [f"entry {i}".encode() for i in range(n)]


def source_for(leaves: list[bytes]):  # type: ignore[no-untyped-def]
    hashes = [leaf_hash(e) for e in leaves]

    def perfect(level: int, index: int) -> bytes:
        first = index << level
        return ref_mth(leaves[first : first + (1 << level)])

    return hashes, perfect


def test_the_frontier_reproduces_the_published_roots() -> None:
    frontier = MerkleFrontier()
    assert frontier.root() == EMPTY_ROOT == _h(b"")
    for leaf, root in zip(VECTOR_LEAVES, VECTOR_ROOTS, strict=True):
        frontier.append(leaf_hash(leaf), 64, [])
        assert frontier.root().hex() == root


def test_the_frontier_root_equals_the_recursive_definition_for_every_size_up_to_300() -> None:
    leaves = entries(300)
    frontier = MerkleFrontier()
    for n in range(1, 301):
        frontier.append(leaf_hash(leaves[n - 1]), 64, [])
        assert frontier.root() == ref_mth(leaves[:n]), n


def test_extend_reports_exactly_the_completed_perfect_subtrees_at_the_stored_levels() -> None:
    leaves = entries(1000)
    frontier = MerkleFrontier()
    completed: list[tuple[int, int, bytes]] = []
    frontier.extend([leaf_hash(e) for e in leaves[:333]], 3, completed)
    frontier.extend([leaf_hash(e) for e in leaves[333:]], 3, completed)
    expected = {(level, index) for level in range(3, 10) for index in range(1000 >> level)}
    assert {(level, index) for level, index, _h in completed} == expected
    for level, index, h in completed:
        assert h == ref_mth(leaves[index << level : (index + 1) << level])


def test_extending_by_batches_of_any_size_equals_appending_leaf_by_leaf() -> None:
    leaves = [leaf_hash(e) for e in entries(700)]
    one_by_one = MerkleFrontier()
    expected: list[tuple[int, int, bytes]] = []
    for h in leaves:
        one_by_one.append(h, 2, expected)
    for sizes in ([1] * 5 + [2, 3, 7, 64, 65, 128, 255, 171], [700], [0, 699, 1, 0], [333, 367]):
        batched = MerkleFrontier()
        completed: list[tuple[int, int, bytes]] = []
        start = 0
        for size in sizes:
            batched.extend(leaves[start : start + size], 2, completed)
            start += size
            assert batched.size == start
            assert batched.root() == ref_mth(entries(700)[:start])
        assert start == 700
        assert batched.hashes == one_by_one.hashes
        assert sorted(completed) == sorted(expected)


def test_a_frontier_survives_serialisation_and_refuses_a_wrong_length() -> None:
    frontier = MerkleFrontier()
    frontier.extend([leaf_hash(e) for e in entries(77)], 64, [])
    again = MerkleFrontier.from_bytes(77, frontier.to_bytes())
    assert again.root() == frontier.root()
    with pytest.raises(ValueError, match="77"):
        MerkleFrontier.from_bytes(77, frontier.to_bytes()[:-1])


def test_ranges_split_into_aligned_perfect_subtrees() -> None:
    assert perfect_pieces(0, 13) == [(3, 0), (2, 2), (0, 12)]
    assert perfect_pieces(8, 13) == [(2, 2), (0, 12)]
    leaves = entries(50)
    _hashes, perfect = source_for(leaves)
    for start, end in [(0, 50), (32, 50), (48, 50), (0, 32), (16, 24)]:
        assert range_hash(start, end, perfect) == ref_mth(leaves[start:end])


def test_inclusion_proofs_match_the_rfc_and_verify_for_every_leaf_of_trees_up_to_40() -> None:
    for n in range(1, 41):
        leaves = entries(n)
        hashes, perfect = source_for(leaves)
        root = ref_mth(leaves)
        for m in range(n):
            proof = inclusion_proof(m, n, perfect)
            assert proof == ref_path(m, leaves), (m, n)
            verify_inclusion(m, n, hashes[m], proof, root)


def test_consistency_proofs_match_the_rfc_and_verify_for_every_pair_of_sizes_up_to_40() -> None:
    leaves = entries(40)
    _hashes, perfect = source_for(leaves)
    for n in range(1, 41):
        for m in range(1, n + 1):
            proof = consistency_proof(m, n, perfect)
            assert proof == (ref_subproof(m, leaves[:n], True) if m < n else []), (m, n)
            verify_consistency(m, n, ref_mth(leaves[:m]), ref_mth(leaves[:n]), proof)


def test_a_wrong_leaf_index_size_or_hash_fails_inclusion() -> None:
    leaves = entries(21)
    hashes, perfect = source_for(leaves)
    root = ref_mth(leaves)
    proof = inclusion_proof(5, 21, perfect)
    verify_inclusion(5, 21, hashes[5], proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(6, 21, hashes[5], proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(5, 21, hashes[6], proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(5, 22, hashes[5], proof, ref_mth(entries(22)))
    with pytest.raises(ProofError):
        verify_inclusion(5, 21, hashes[5], proof[:-1], root)
    with pytest.raises(ProofError):
        verify_inclusion(5, 21, hashes[5], [*proof, proof[0]], root)
    flipped = bytearray(proof[2])
    flipped[0] ^= 1
    with pytest.raises(ProofError):
        verify_inclusion(5, 21, hashes[5], [*proof[:2], bytes(flipped), *proof[3:]], root)
    with pytest.raises(ProofError):
        root_from_inclusion_proof(21, 21, hashes[5], proof)


def test_a_forked_history_fails_the_consistency_check() -> None:
    leaves = entries(30)
    _hashes, perfect = source_for(leaves)
    fork = [*leaves[:17], b"a different entry 17", *leaves[18:]]
    _fork_hashes, fork_perfect = source_for(fork)
    old_root = ref_mth(leaves[:20])
    # The fork's own proof between its sizes is fine, but not against the original old root.
    proof = consistency_proof(20, 30, fork_perfect)
    verify_consistency(20, 30, ref_mth(fork[:20]), ref_mth(fork), proof)
    with pytest.raises(ProofError, match="forked"):
        verify_consistency(20, 30, old_root, ref_mth(fork), proof)
    # Nor does the original's proof lead to the fork's new root.
    with pytest.raises(ProofError):
        verify_consistency(20, 30, old_root, ref_mth(fork), consistency_proof(20, 30, perfect))
    with pytest.raises(ProofError, match="forked"):
        verify_consistency(20, 20, old_root, ref_mth(fork[:20]), [])


def test_consistency_proofs_refuse_impossible_sizes() -> None:
    _hashes, perfect = source_for(entries(8))
    with pytest.raises(ProofError):
        consistency_proof(9, 8, perfect)
    with pytest.raises(ProofError):
        verify_consistency(3, 8, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 8, EMPTY_ROOT, ref_mth(entries(8)), [])


def test_a_compact_range_extended_by_batches_equals_one_built_leaf_by_leaf() -> None:
    leaves = [leaf_hash(e) for e in entries(900)]
    rng = random.Random(5)
    for _ in range(60):
        begin = rng.randrange(0, 400)
        batched = CompactRange(begin)
        one_by_one = CompactRange(begin)
        completed: list[tuple[int, int, bytes]] = []
        expected: list[tuple[int, int, bytes]] = []
        position = begin
        while position < 900:
            size = min(rng.choice([0, 1, 2, 3, 5, 17, 64, 100, 257]), 900 - position)
            batched.extend(leaves[position : position + size], 2, completed)
            for index in range(position, position + size):
                one_by_one.append_piece(0, index, leaves[index], 2, expected)
            position += size
            assert (batched.levels, batched.hashes, batched.end) == (
                one_by_one.levels,
                one_by_one.hashes,
                one_by_one.end,
            )
        assert sorted(completed) == sorted(expected)


def test_compact_ranges_hashed_apart_and_joined_give_the_whole_tree() -> None:
    leaves = [leaf_hash(e) for e in entries(777)]
    whole = MerkleFrontier()
    whole.extend(leaves, 64, [])
    for cuts in ([0, 777], [0, 300, 777], [0, 1, 2, 3, 500, 776, 777], [0, 256, 512, 777]):
        joined = CompactRange(0)
        completed: list[tuple[int, int, bytes]] = []
        for begin, end in itertools.pairwise(cuts):
            part = CompactRange(begin)
            part.extend(leaves[begin:end], 4, completed)
            for piece in part.pieces():
                joined.append_piece(*piece, 4, completed)
        assert joined.end == 777
        assert joined.root() == whole.root()
        assert joined.to_bytes() == whole.to_bytes()
        assert {(level, index) for level, index, _h in completed} == {
            (level, index) for level in range(4, 10) for index in range(777 >> level)
        }
    part = CompactRange(10)
    with pytest.raises(ValueError, match="does not start"):
        part.append_piece(0, 11, leaves[11], 64, [])
    with pytest.raises(ValueError, match="leaf 0"):
        part.root()
