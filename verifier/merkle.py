"""RFC 6962 / RFC 9162 Merkle tree hashing, proofs and their verification.

Proof generation is split in two: `inclusion_proof_ranges` and
`consistency_proof_ranges` plan which subtrees a proof needs, and the hashing
of those subtrees happens elsewhere (from a list of leaf hashes here, from
tiles in `verifier.tiles`), so that one proof is one batched read.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from verifier.errors import VerificationError

HASH_SIZE = 32

EMPTY_ROOT = hashlib.sha256(b"").digest()

_INCLUSION_FAILED = "inclusion proof does not verify"
_CONSISTENCY_FAILED = "consistency proof does not verify"

# A range of leaves [start, end) whose Merkle tree hash is one proof element.
LeafRange = tuple[int, int]

# A perfect subtree: (height, index) covers leaves [index << height,
# (index + 1) << height).
Node = tuple[int, int]


def leaf_hash(leaf: bytes) -> bytes:
    """MTH({d}) = SHA-256(0x00 || d), RFC 9162 section 2.1.1."""
    return hashlib.sha256(b"\x00" + leaf).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """MTH(D[n]) = SHA-256(0x01 || MTH(D[0:k]) || MTH(D[k:n])), RFC 9162 2.1.1."""
    return hashlib.sha256(b"\x01" + left + right).digest()


def root_from_leaf_hashes(hashes: Sequence[bytes]) -> bytes:
    """MTH(D[n]) from the leaf hashes, RFC 9162 section 2.1.1.

    Hashes level by level; a node without a sibling moves up unchanged,
    which is the same tree as splitting at the largest power of two below n.
    """
    if not hashes:
        return EMPTY_ROOT
    level = list(hashes)
    while len(level) > 1:
        paired = [
            node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)
        ]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _split(n: int) -> int:
    """The largest power of two smaller than n (n > 1), RFC 9162 section 2.1.1."""
    return 1 << ((n - 1).bit_length() - 1)


def inclusion_proof_ranges(index: int, size: int) -> list[LeafRange]:
    """The leaf ranges whose hashes form PATH(index, D[size]), RFC 9162 2.1.3.1.

    PATH(m, D[1]) = {}; with k the largest power of two below n,
    PATH(m, D[n]) = PATH(m, D[0:k]) : MTH(D[k:n])      for m < k,
    PATH(m, D[n]) = PATH(m - k, D[k:n]) : MTH(D[0:k])  for m >= k.
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is not in a tree of size {size}")
    ranges: list[LeafRange] = []
    start, end = 0, size
    while end - start > 1:
        k = _split(end - start)
        if index < start + k:
            ranges.append((start + k, end))
            end = start + k
        else:
            ranges.append((start, start + k))
            start += k
    ranges.reverse()
    return ranges


def consistency_proof_ranges(old_size: int, new_size: int) -> list[LeafRange]:
    """The leaf ranges whose hashes form PROOF(m, D[n]), RFC 9162 2.1.4.1.

    PROOF(m, D[n]) = SUBPROOF(m, D[n], true); SUBPROOF(m, D[m], true) = {};
    SUBPROOF(m, D[m], false) = {MTH(D[m])}; with k the largest power of two
    below n, SUBPROOF(m, D[n], b) = SUBPROOF(m, D[0:k], b) : MTH(D[k:n]) for
    m <= k, and SUBPROOF(m - k, D[k:n], false) : MTH(D[0:k]) for m > k.
    The proof is empty when m is 0 or m equals n.
    """
    if not 0 <= old_size <= new_size:
        raise ValueError(f"no consistency proof from size {old_size} to {new_size}")
    ranges: list[LeafRange] = []
    if old_size in (0, new_size):
        return ranges
    start, m, n, whole = 0, old_size, new_size, True
    while m != n:
        k = _split(n)
        if m <= k:
            ranges.append((start + k, start + n))
            n = k
        else:
            ranges.append((start, start + k))
            start, m, n, whole = start + k, m - k, n - k, False
    if not whole:
        ranges.append((start, start + n))
    ranges.reverse()
    return ranges


def range_nodes(start: int, end: int) -> list[Node]:
    """The perfect subtrees, left to right, whose hashes make MTH(D[start:end]).

    The range must be one that appears in a Merkle tree: a non-empty range
    whose start is a multiple of the largest power of two not above its length.
    MTH of the range is the right fold of node_hash over the subtree hashes.
    """
    if not 0 <= start < end or start % (1 << ((end - start).bit_length() - 1)):
        raise ValueError(f"leaves [{start}, {end}) are not a subtree")
    nodes: list[Node] = []
    while start < end:
        height = (end - start).bit_length() - 1
        nodes.append((height, start >> height))
        start += 1 << height
    return nodes


def fold_nodes(hashes: Sequence[bytes]) -> bytes:
    """MTH of a range from the hashes of its `range_nodes`."""
    if not hashes:
        raise ValueError("no subtree hashes to fold")
    result = hashes[-1]
    for h in reversed(hashes[:-1]):
        result = node_hash(h, result)
    return result


def inclusion_proof(hashes: Sequence[bytes], index: int, size: int) -> list[bytes]:
    """PATH(index, D[size]) from the leaf hashes, RFC 9162 section 2.1.3.1."""
    if size > len(hashes):
        raise ValueError(f"tree size {size} is above the {len(hashes)} leaf hashes")
    return [
        root_from_leaf_hashes(hashes[a:b])
        for a, b in inclusion_proof_ranges(index, size)
    ]


def consistency_proof(
    hashes: Sequence[bytes], old_size: int, new_size: int
) -> list[bytes]:
    """PROOF(old_size, D[new_size]) from the leaf hashes, RFC 9162 2.1.4.1."""
    if new_size > len(hashes):
        raise ValueError(f"tree size {new_size} is above the {len(hashes)} leaf hashes")
    return [
        root_from_leaf_hashes(hashes[a:b])
        for a, b in consistency_proof_ranges(old_size, new_size)
    ]


def _check_hash(name: str, value: bytes) -> None:
    if len(value) != HASH_SIZE:
        raise ValueError(f"{name} is {len(value)} bytes, not {HASH_SIZE}")


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that leaf_hash is leaf `index` of the tree of `size` with `root`.

    RFC 9162 section 2.1.3.2:
    1. index must be below size;
    2. fn = index, sn = size - 1, r = leaf_hash;
    3. for each p in the proof: fail if sn is 0; if LSB(fn) is set or fn
       equals sn, r = node_hash(p, r) and, if LSB(fn) is not set, shift fn
       and sn right until LSB(fn) is set or fn is 0; otherwise
       r = node_hash(r, p); then shift fn and sn right once;
    4. sn must be 0 and r must equal root.
    """
    _check_hash("leaf hash", leaf_hash)
    _check_hash("root", root)
    if index < 0 or size < 0:
        raise ValueError("leaf index and tree size must not be negative")
    # 1.
    if index >= size:
        raise VerificationError(_INCLUSION_FAILED)
    # 2.
    fn, sn, r = index, size - 1, leaf_hash
    # 3.
    for p in proof:
        if sn == 0 or len(p) != HASH_SIZE:
            raise VerificationError(_INCLUSION_FAILED)
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    # 4.
    if sn != 0 or r != root:
        raise VerificationError(_INCLUSION_FAILED)


def verify_consistency(
    old_size: int,
    new_size: int,
    old_root: bytes,
    new_root: bytes,
    proof: Sequence[bytes],
) -> None:
    """Check that the tree of old_size and old_root is a prefix of the new tree.

    RFC 9162 section 2.1.4.2, with the two cases it leaves out: equal sizes
    need an empty proof and equal roots, and the empty tree (whose root must
    be EMPTY_ROOT) is a prefix of every tree, with an empty proof.
    1. if old_size is a power of two, prepend old_root to the proof;
    2. fn = old_size - 1, sn = new_size - 1;
    3. while LSB(fn) is set, shift fn and sn right;
    4. fr = sr = the first proof hash;
    5. for each further c: fail if sn is 0; if LSB(fn) is set or fn equals
       sn, fr = node_hash(c, fr), sr = node_hash(c, sr) and, if LSB(fn) is
       not set, shift fn and sn right until LSB(fn) is set or fn is 0;
       otherwise sr = node_hash(sr, c); then shift fn and sn right once;
    6. fr must equal old_root, sr must equal new_root and sn must be 0.
    """
    _check_hash("old root", old_root)
    _check_hash("new root", new_root)
    if old_size < 0 or new_size < 0:
        raise ValueError("tree sizes must not be negative")
    if old_size > new_size or any(len(c) != HASH_SIZE for c in proof):
        raise VerificationError(_CONSISTENCY_FAILED)
    if old_size == 0:
        if proof or old_root != EMPTY_ROOT:
            raise VerificationError(_CONSISTENCY_FAILED)
        return
    if old_size == new_size:
        if proof or old_root != new_root:
            raise VerificationError(_CONSISTENCY_FAILED)
        return
    if not proof:
        raise VerificationError(_CONSISTENCY_FAILED)
    # 1.
    path = list(proof)
    if old_size & (old_size - 1) == 0:
        path.insert(0, old_root)
    # 2.
    fn, sn = old_size - 1, new_size - 1
    # 3.
    while fn & 1:
        fn >>= 1
        sn >>= 1
    # 4.
    fr = sr = path[0]
    # 5.
    for c in path[1:]:
        if sn == 0:
            raise VerificationError(_CONSISTENCY_FAILED)
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    # 6.
    if fr != old_root or sr != new_root or sn != 0:
        raise VerificationError(_CONSISTENCY_FAILED)
