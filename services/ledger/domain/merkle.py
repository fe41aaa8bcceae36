"""Merkle trees over the ledger's entries exactly as RFC 9162 (Certificate Transparency v2) defines them.

Hashes (RFC 9162 §2.1.1), with SHA-256:

    MTH({})      = SHA-256()
    leaf hash    = SHA-256(0x00 || entry)
    node hash    = SHA-256(0x01 || left || right)
    MTH(D[n])    = node hash of MTH(D[0:k]) and MTH(D[k:n]),  k the largest power of two < n

Inclusion proofs (§2.1.3) and consistency proofs (§2.1.4) are generated from
the recursive definitions and checked with the RFC's iterative verification
algorithms, so any implementation of the RFC can check what this one makes.

A `MerkleFrontier` is the compact form of a tree of size n: the roots of the
perfect subtrees of n's binary decomposition, largest first. Appending a
leaf costs one hash on average, and the root follows in O(log n), so a
checkpoint after every batch never re-hashes the whole tree. Perfect,
aligned subtrees never change once complete; `perfect subtree (level,
index)` covers leaves [index·2^level, (index+1)·2^level).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence

from services.ledger.domain.hashing import pair_up_level, sha256

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_sha256 = sha256
_pair_up_level = pair_up_level


class ProofError(ValueError):
    """A Merkle proof that does not verify, or a request for a proof that cannot exist."""


def leaf_hash(entry: bytes) -> bytes:
    return _sha256(b"\x00" + entry).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def _pair_up(
    nodes: Sequence[bytes], level: int, index: int, min_level: int, completed: list[tuple[int, int, bytes]]
) -> list[bytes]:
    """The next level's nodes: `nodes` (the first at even `index` of `level`) hashed two by two.

    An odd last node is left out. The new nodes are added to `completed` as
    (level, index, hash) when their level is at least `min_level`.
    """
    level_hashes = _pair_up_level(b"".join(nodes[: len(nodes) & ~1]))
    parents = [level_hashes[i : i + HASH_SIZE] for i in range(0, len(level_hashes), HASH_SIZE)]
    if level + 1 >= min_level:
        first = index >> 1
        completed.extend((level + 1, first + i, h) for i, h in enumerate(parents))
    return parents


def largest_power_of_two_below(n: int) -> int:
    """The largest power of two strictly smaller than n (n ≥ 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of a list of leaf hashes, by the recursive definition (for tests and small trees)."""
    n = len(leaf_hashes)
    if n == 0:
        return EMPTY_ROOT
    if n == 1:
        return leaf_hashes[0]
    k = largest_power_of_two_below(n)
    return node_hash(root_of(leaf_hashes[:k]), root_of(leaf_hashes[k:]))


class MerkleFrontier:
    """The compact range [0, size) of a growing tree; appending reports the perfect subtrees it completes."""

    __slots__ = ("hashes", "size")

    def __init__(self, size: int = 0, hashes: Sequence[bytes] = ()) -> None:
        if len(hashes) != size.bit_count():
            raise ValueError(f"a frontier of size {size} has {size.bit_count()} hashes, got {len(hashes)}")
        self.size = size
        self.hashes = list(hashes)

    def copy(self) -> MerkleFrontier:
        return MerkleFrontier(self.size, self.hashes)

    def append(self, leaf: bytes, min_level: int, completed: list[tuple[int, int, bytes]]) -> None:
        """Append one leaf hash; perfect subtrees of level ≥ min_level it completes go to `completed`."""
        size = self.size
        hashes = self.hashes
        h = leaf
        level = 0
        s = size
        while s & 1:
            h = _sha256(b"\x01" + hashes.pop() + h).digest()
            level += 1
            s >>= 1
            if level >= min_level:
                completed.append((level, ((size + 1) >> level) - 1, h))
        hashes.append(h)
        self.size = size + 1

    def extend(
        self, leaves: Sequence[bytes], min_level: int, completed: list[tuple[int, int, bytes]]
    ) -> None:
        """Append many leaf hashes, the same as `append` for each, one tree level at a time.

        At each level the new nodes (preceded by the frontier's node of that
        level when they start at an odd index) are hashed in pairs into the
        next level; an unpaired last node becomes the frontier's node of its
        level. Hashing a whole level in one loop costs less than walking up
        from every leaf. The subtrees completed at levels ≥ min_level are
        reported level by level.
        """
        self.extend_joined(b"".join(leaves), min_level, completed)

    def extend_joined(self, leaves: bytes, min_level: int, completed: list[tuple[int, int, bytes]]) -> None:
        """`extend` with the leaf hashes joined into one byte string (32 bytes each)."""
        if len(leaves) % HASH_SIZE:
            raise ValueError(f"leaf hashes must be a whole number of {HASH_SIZE}-byte hashes")
        hashes = self.hashes
        current = leaves
        index = self.size  # of the first node of `current` within its level
        level = 0
        unpaired: list[bytes] = []  # the new frontier nodes, lowest level first
        while current:
            if index & 1:
                current = hashes.pop() + current
                index -= 1
            if len(current) & HASH_SIZE:  # an odd number of nodes
                unpaired.append(current[-HASH_SIZE:])
            parents = _pair_up_level(current)
            level += 1
            index >>= 1
            if level >= min_level:
                completed.extend(
                    (level, index + i, parents[HASH_SIZE * i : HASH_SIZE * (i + 1)])
                    for i in range(len(parents) // HASH_SIZE)
                )
            current = parents
        unpaired.reverse()
        hashes.extend(unpaired)
        self.size += len(leaves) // HASH_SIZE

    def root(self) -> bytes:
        hashes = self.hashes
        if not hashes:
            return EMPTY_ROOT
        r = hashes[-1]
        for h in reversed(hashes[:-1]):
            r = _sha256(b"\x01" + h + r).digest()
        return r

    def to_bytes(self) -> bytes:
        return b"".join(self.hashes)

    @classmethod
    def from_bytes(cls, size: int, data: bytes) -> MerkleFrontier:
        if len(data) != HASH_SIZE * size.bit_count():
            raise ValueError(
                f"a frontier of size {size} is {HASH_SIZE * size.bit_count()} bytes long, got {len(data)}"
            )
        return cls(size, [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)])


class CompactRange:
    """The maximal aligned perfect subtrees (level, index, hash) covering leaves [begin, end).

    Ranges that meet can be joined (`append_piece`), so a tree can be hashed
    in parts, one per process, and put together; for begin = 0 the pieces are
    exactly a `MerkleFrontier`'s hashes, and `root()` is the tree's root.
    """

    __slots__ = ("begin", "end", "hashes", "levels")

    def __init__(self, begin: int = 0) -> None:
        self.begin = begin
        self.end = begin
        self.levels: list[int] = []
        self.hashes: list[bytes] = []

    def copy(self) -> CompactRange:
        other = CompactRange(self.begin)
        other.end = self.end
        other.levels = list(self.levels)
        other.hashes = list(self.hashes)
        return other

    def pieces(self) -> list[tuple[int, int, bytes]]:
        out = []
        position = self.end
        for level, h in zip(reversed(self.levels), reversed(self.hashes), strict=True):
            position -= 1 << level
            out.append((level, position >> level, h))
        out.reverse()
        return out

    def extend(
        self, leaves: Sequence[bytes], min_level: int, completed: list[tuple[int, int, bytes]]
    ) -> None:
        """Append leaf hashes; perfect subtrees of level ≥ min_level they complete go to `completed`.

        One tree level at a time, as `MerkleFrontier.extend`: at each level the
        new nodes are hashed in pairs. A first node at an odd index pairs with
        the range's last piece if that is its sibling; otherwise its sibling
        reaches before `begin`, so the node stays a piece of the range, as does
        every first node above it. An unpaired last node stays a piece too.
        """
        levels = self.levels
        hashes = self.hashes
        current = list(leaves)
        index = self.end  # of current[0] within its level
        level = 0
        joining = True  # the new nodes still meet the range's last piece
        left: list[tuple[int, bytes]] = []  # pieces at the new nodes' left edge, lowest level first
        right: list[tuple[int, bytes]] = []  # pieces at their right edge, lowest level first
        while current:
            if index & 1:
                if joining and levels and levels[-1] == level:
                    levels.pop()
                    current.insert(0, hashes.pop())
                    index -= 1
                else:
                    joining = False
                    left.append((level, current.pop(0)))
                    index += 1
                    if not current:
                        break
            count = len(current)
            if count & 1:
                right.append((level, current[-1]))
            current = _pair_up(current, level, index, min_level, completed)
            level += 1
            index >>= 1
        right.reverse()
        for piece_level, h in itertools.chain(left, right):
            levels.append(piece_level)
            hashes.append(h)
        self.end += len(leaves)

    def append_piece(
        self, level: int, index: int, h: bytes, min_level: int, completed: list[tuple[int, int, bytes]]
    ) -> None:
        """Append the perfect subtree (level, index), which must start where this range ends."""
        if index << level != self.end:
            raise ValueError(
                f"subtree ({level}, {index}) does not start at the end of the range ({self.end})"
            )
        self.end += 1 << level
        levels = self.levels
        hashes = self.hashes
        while index & 1 and levels and levels[-1] == level:
            h = node_hash(hashes.pop(), h)
            levels.pop()
            level += 1
            index >>= 1
            if level >= min_level:
                completed.append((level, index, h))
        hashes.append(h)
        levels.append(level)

    def root(self) -> bytes:
        if self.begin != 0:
            raise ValueError("only a range that starts at leaf 0 has a root")
        hashes = self.hashes
        if not hashes:
            return EMPTY_ROOT
        r = hashes[-1]
        for h in reversed(hashes[:-1]):
            r = _sha256(b"\x01" + h + r).digest()
        return r

    def to_bytes(self) -> bytes:
        return b"".join(self.hashes)


PerfectSubtree = Callable[[int, int], bytes]
"""perfect(level, index): the root of the aligned perfect subtree; level 0 is a leaf hash."""


def perfect_pieces(start: int, end: int) -> list[tuple[int, int]]:
    """Split [start, end) into aligned perfect subtrees (level, index), left to right, largest possible."""
    pieces = []
    p = start
    while p < end:
        level = (p & -p).bit_length() - 1 if p else (end - p).bit_length() - 1
        while (1 << level) > end - p:
            level -= 1
        pieces.append((level, p >> level))
        p += 1 << level
    return pieces


def range_hash(start: int, end: int, perfect: PerfectSubtree) -> bytes:
    """MTH of the leaves [start, end) of an RFC 9162 subtree (perfect, or a right edge of the tree)."""
    if end <= start:
        raise ProofError(f"empty range [{start}, {end})")
    pieces = perfect_pieces(start, end)
    r = perfect(*pieces[-1])
    for level, index in reversed(pieces[:-1]):
        r = node_hash(perfect(level, index), r)
    return r


def inclusion_proof(leaf_index: int, tree_size: int, perfect: PerfectSubtree) -> list[bytes]:
    """PATH(m, D[n]) of RFC 9162 §2.1.3.1, bottom-up, for the leaf at `leaf_index`."""
    if not 0 <= leaf_index < tree_size:
        raise ProofError(f"leaf index {leaf_index} is not in a tree of size {tree_size}")
    path: list[bytes] = []

    def walk(m: int, lo: int, hi: int) -> None:
        n = hi - lo
        if n == 1:
            return
        k = largest_power_of_two_below(n)
        if m < k:
            walk(m, lo, lo + k)
            path.append(range_hash(lo + k, hi, perfect))
        else:
            walk(m - k, lo + k, hi)
            path.append(range_hash(lo, lo + k, perfect))

    walk(leaf_index, 0, tree_size)
    return path


def consistency_proof(old_size: int, new_size: int, perfect: PerfectSubtree) -> list[bytes]:
    """PROOF(m, D[n]) of RFC 9162 §2.1.4.1: shows the tree of `old_size` is a prefix of `new_size`."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"no consistency proof from size {old_size} to size {new_size}")
    if old_size == 0 or old_size == new_size:
        return []
    proof: list[bytes] = []

    def sub(m: int, lo: int, hi: int, whole: bool) -> None:
        n = hi - lo
        if m == n:
            if not whole:
                proof.append(range_hash(lo, hi, perfect))
            return
        k = largest_power_of_two_below(n)
        if m <= k:
            sub(m, lo, lo + k, whole)
            proof.append(range_hash(lo + k, hi, perfect))
        else:
            sub(m - k, lo + k, hi, False)
            proof.append(range_hash(lo, lo + k, perfect))

    sub(old_size, 0, new_size, True)
    return proof


def root_from_inclusion_proof(leaf_index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root implied by an inclusion proof (RFC 9162 §2.1.3.2 steps 1-4); raises ProofError if malformed."""
    if not 0 <= leaf_index < tree_size:
        raise ProofError(f"leaf index {leaf_index} is not in a tree of size {tree_size}")
    fn = leaf_index
    sn = tree_size - 1
    r = leaf
    for p in proof:
        if len(p) != HASH_SIZE:
            raise ProofError(f"proof hash of {len(p)} bytes, expected {HASH_SIZE}")
        if sn == 0:
            raise ProofError("inclusion proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("inclusion proof is shorter than the tree is deep")
    return r


def verify_inclusion(
    leaf_index: int, tree_size: int, leaf: bytes, proof: Sequence[bytes], root: bytes
) -> None:
    """Raise ProofError unless `proof` shows `leaf` at `leaf_index` in the tree of `tree_size` and `root`."""
    if root_from_inclusion_proof(leaf_index, tree_size, leaf, proof) != root:
        raise ProofError(
            f"inclusion proof for leaf {leaf_index} does not lead to the root of size {tree_size}"
        )


def verify_consistency(
    old_size: int, new_size: int, old_root: bytes, new_root: bytes, proof: Sequence[bytes]
) -> None:
    """RFC 9162 §2.1.4.2: raise ProofError unless the tree (old_size, old_root) is a prefix of (new_size, new_root)."""
    if not 0 <= old_size <= new_size:
        raise ProofError(f"size {old_size} cannot be a prefix of size {new_size}")
    if old_size == new_size:
        if proof:
            raise ProofError("a proof between equal sizes must be empty")
        if old_root != new_root:
            raise ProofError(f"two different roots for the same size {old_size}: the history forked")
        return
    if old_size == 0:
        if proof:
            raise ProofError("a proof from the empty tree must be empty")
        return
    if not proof:
        raise ProofError("empty consistency proof between different sizes")
    if any(len(p) != HASH_SIZE for p in proof):
        raise ProofError(f"consistency proof hashes must be {HASH_SIZE} bytes")
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    fn = old_size - 1
    sn = new_size - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise ProofError("consistency proof is longer than the tree is deep")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            if not fn & 1:
                while fn and not fn & 1:
                    fn >>= 1
                    sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise ProofError("consistency proof is shorter than the tree is deep")
    if fr != old_root:
        raise ProofError(
            f"consistency proof does not lead to the old root of size {old_size}: the history forked"
        )
    if sr != new_root:
        raise ProofError(f"consistency proof does not lead to the new root of size {new_size}")
