"""Merkle hashing and proofs: Go reference vectors and every tree up to 100."""

from __future__ import annotations

import base64
import itertools
import json
from collections.abc import Sequence
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verifier.errors import VerificationError
from verifier.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    consistency_proof,
    consistency_proof_ranges,
    fold_nodes,
    inclusion_proof,
    inclusion_proof_ranges,
    leaf_hash,
    node_hash,
    range_nodes,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "tlog-vectors.json").read_text()
)
MAX_SIZE = 100

HASHES = [
    leaf_hash(VECTORS["leaf_data_format"].replace("%d", str(i)).encode())
    for i in range(1000)
]


def b64(text: str) -> bytes:
    return base64.b64decode(text, validate=True)


def proof_of(vector: dict[str, Any]) -> list[bytes]:
    return [b64(h) for h in vector["Proof"] or []]


def mth(hashes: Sequence[bytes]) -> bytes:
    """MTH by the recursive definition of RFC 9162 2.1.1, independent of the code."""
    if not hashes:
        return EMPTY_ROOT
    if len(hashes) == 1:
        return hashes[0]
    k = 1
    while k * 2 < len(hashes):
        k *= 2
    return node_hash(mth(hashes[:k]), mth(hashes[k:]))


@cache
def root(size: int) -> bytes:
    return root_from_leaf_hashes(HASHES[:size])


def flipped(proof: Sequence[bytes], i: int) -> list[bytes]:
    """The proof with one byte of hash i flipped."""
    bad = list(proof)
    h = bytearray(bad[i])
    h[(i * 7) % HASH_SIZE] ^= 0x01
    bad[i] = bytes(h)
    return bad


def test_empty_and_leaf_hash_vectors() -> None:
    assert b64(VECTORS["empty_root"]) == EMPTY_ROOT
    assert root_from_leaf_hashes([]) == EMPTY_ROOT
    assert HASHES[0] == b64(VECTORS["leaf0_hash"])


@pytest.mark.parametrize("size", sorted(int(size) for size in VECTORS["roots"]))
def test_root_vectors(size: int) -> None:
    assert root(size) == b64(VECTORS["roots"][str(size)])


def test_root_matches_recursive_definition() -> None:
    for size in range(MAX_SIZE + 1):
        assert root(size) == mth(HASHES[:size]), size


@pytest.mark.parametrize(
    "vector", VECTORS["inclusion"], ids=lambda v: f"{v['N']}-{v['T']}"
)
def test_inclusion_vectors(vector: dict[str, Any]) -> None:
    index, size, proof = vector["N"], vector["T"], proof_of(vector)
    assert inclusion_proof(HASHES, index, size) == proof
    verify_inclusion(HASHES[index], index, size, proof, root(size))
    for i in range(len(proof)):
        with pytest.raises(VerificationError):
            verify_inclusion(HASHES[index], index, size, flipped(proof, i), root(size))


@pytest.mark.parametrize(
    "vector", VECTORS["consistency_T_new_N_old"], ids=lambda v: f"{v['N']}-{v['T']}"
)
def test_consistency_vectors(vector: dict[str, Any]) -> None:
    # Go's order: T is the new size, N the old one.
    new, old, proof = vector["T"], vector["N"], proof_of(vector)
    assert consistency_proof(HASHES, old, new) == proof
    verify_consistency(old, new, root(old), root(new), proof)
    for i in range(len(proof)):
        with pytest.raises(VerificationError):
            verify_consistency(old, new, root(old), root(new), flipped(proof, i))


@pytest.mark.parametrize("size", range(1, MAX_SIZE + 1))
def test_every_inclusion_proof(size: int) -> None:
    for index in range(size):
        leaf = HASHES[index]
        proof = inclusion_proof(HASHES, index, size)
        verify_inclusion(leaf, index, size, proof, root(size))
        for i in range(len(proof)):
            with pytest.raises(VerificationError):
                verify_inclusion(leaf, index, size, flipped(proof, i), root(size))
        bad_root = flipped([root(size)], 0)[0]
        with pytest.raises(VerificationError):
            verify_inclusion(leaf, index, size, proof, bad_root)
        with pytest.raises(VerificationError):
            verify_inclusion(HASHES[size], index, size, proof, root(size))
        for other in (index - 1, index + 1):
            if other >= 0:
                with pytest.raises(VerificationError):
                    verify_inclusion(leaf, other, size, proof, root(size))
        for other_size in (size - 1, size + 1):
            if index < other_size:
                with pytest.raises(VerificationError):
                    verify_inclusion(leaf, index, other_size, proof, root(other_size))
        with pytest.raises(VerificationError):
            verify_inclusion(leaf, index, size, [*proof, root(size)], root(size))
        if proof:
            with pytest.raises(VerificationError):
                verify_inclusion(leaf, index, size, proof[:-1], root(size))


@pytest.mark.parametrize("new", range(1, MAX_SIZE + 1))
def test_every_consistency_proof(new: int) -> None:
    for old in range(1, new + 1):
        proof = consistency_proof(HASHES, old, new)
        verify_consistency(old, new, root(old), root(new), proof)
        for i in range(len(proof)):
            with pytest.raises(VerificationError):
                verify_consistency(old, new, root(old), root(new), flipped(proof, i))
        with pytest.raises(VerificationError):
            verify_consistency(old, new, flipped([root(old)], 0)[0], root(new), proof)
        with pytest.raises(VerificationError):
            verify_consistency(old, new, root(old), flipped([root(new)], 0)[0], proof)
        if old > 1:
            with pytest.raises(VerificationError):
                verify_consistency(old - 1, new, root(old - 1), root(new), proof)
        with pytest.raises(VerificationError):
            verify_consistency(old, new + 1, root(old), root(new + 1), proof)
        with pytest.raises(VerificationError):
            verify_consistency(old, new, root(old), root(new), [*proof, root(new)])
        if proof:
            with pytest.raises(VerificationError):
                verify_consistency(old, new, root(old), root(new), proof[:-1])


def test_consistency_edge_cases() -> None:
    verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(0, 5, EMPTY_ROOT, root(5), [])
    verify_consistency(5, 5, root(5), root(5), [])
    assert consistency_proof(HASHES, 0, 5) == []
    assert consistency_proof(HASHES, 5, 5) == []
    with pytest.raises(VerificationError):
        verify_consistency(0, 5, EMPTY_ROOT, root(5), [root(5)])
    with pytest.raises(VerificationError):
        verify_consistency(0, 5, root(1), root(5), [])
    with pytest.raises(VerificationError):
        verify_consistency(5, 5, root(5), root(6), [])
    with pytest.raises(VerificationError):
        verify_consistency(5, 5, root(5), root(5), [root(5)])
    with pytest.raises(VerificationError):
        verify_consistency(6, 5, root(6), root(5), consistency_proof(HASHES, 5, 6))
    with pytest.raises(VerificationError):
        verify_consistency(3, 5, root(3), root(5), [])
    with pytest.raises(VerificationError):
        verify_consistency(3, 5, root(3), root(5), [b"\x00" * 31])


def test_inclusion_edge_cases() -> None:
    verify_inclusion(HASHES[0], 0, 1, [], root(1))
    with pytest.raises(VerificationError):
        verify_inclusion(HASHES[0], 1, 1, [], root(1))
    with pytest.raises(VerificationError):
        verify_inclusion(HASHES[0], 0, 0, [], EMPTY_ROOT)
    proof = inclusion_proof(HASHES, 3, 7)
    with pytest.raises(VerificationError):
        verify_inclusion(HASHES[3], 3, 7, [*proof[:-1], proof[-1][:-1]], root(7))


def test_caller_misuse_is_value_error() -> None:
    with pytest.raises(ValueError):
        verify_inclusion(HASHES[0][:31], 0, 1, [], root(1))
    with pytest.raises(ValueError):
        verify_inclusion(HASHES[0], -1, 1, [], root(1))
    with pytest.raises(ValueError):
        verify_consistency(-1, 1, EMPTY_ROOT, root(1), [])
    with pytest.raises(ValueError):
        verify_consistency(1, 2, root(1) + b"\x00", root(2), [])
    with pytest.raises(ValueError):
        inclusion_proof(HASHES[:3], 0, 4)
    with pytest.raises(ValueError):
        inclusion_proof(HASHES, 4, 4)
    with pytest.raises(ValueError):
        consistency_proof(HASHES, 5, 4)
    with pytest.raises(ValueError):
        range_nodes(1, 3)
    # VerificationError and ValueError stay apart.
    assert not issubclass(VerificationError, ValueError)


def test_range_nodes_fold_to_the_range_hash() -> None:
    for size in range(1, MAX_SIZE + 1):
        nodes = range_nodes(0, size)
        hashes = [mth(HASHES[i << h : (i + 1) << h]) for h, i in nodes]
        assert fold_nodes(hashes) == root(size)
        for index in range(size):
            for start, end in inclusion_proof_ranges(index, size):
                range_nodes(start, end)
        for old in range(1, size):
            for start, end in consistency_proof_ranges(old, size):
                range_nodes(start, end)


@given(st.integers(1, 1 << 62), st.data())
def test_proof_plans_on_large_trees(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1))
    old = data.draw(st.integers(0, size))
    ranges = inclusion_proof_ranges(index, size)
    assert len(ranges) <= 64
    # Proof elements are disjoint, cover everything but the leaf, and are subtrees.
    covered = sorted([*ranges, (index, index + 1)])
    assert covered[0][0] == 0 and covered[-1][1] == size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(covered))
    for start, end in ranges + consistency_proof_ranges(old, size):
        range_nodes(start, end)
