"""The server's in-memory tree against the verifier's reference definitions."""

from __future__ import annotations

import pytest

from logserver.tree import MerkleTree
from verifier import merkle
from verifier.merkle import EMPTY_ROOT, leaf_hash
from verifier.tiles import TILE_WIDTH

N = 100
HASHES = [leaf_hash(b"leaf-%d" % i) for i in range(N)]


@pytest.fixture(scope="module")
def tree() -> MerkleTree:
    tree = MerkleTree()
    tree.append(HASHES)
    return tree


def test_empty_tree_has_the_empty_root() -> None:
    assert MerkleTree().root() == EMPTY_ROOT


@pytest.mark.parametrize("size", range(1, N + 1))
def test_proofs_match_the_reference_at_every_size(tree: MerkleTree, size: int) -> None:
    root = merkle.root_from_leaf_hashes(HASHES[:size])
    assert tree.root(size) == root
    for index in range(size):
        proof = tree.inclusion_proof(index, size)
        assert proof == merkle.inclusion_proof(HASHES, index, size)
        merkle.verify_inclusion(HASHES[index], index, size, proof, root)
    for old in range(size + 1):
        proof = tree.consistency_proof(old, size)
        assert proof == merkle.consistency_proof(HASHES, old, size)
        old_root = merkle.root_from_leaf_hashes(HASHES[:old])
        merkle.verify_consistency(old, size, old_root, root, proof)


def test_rebuilding_from_leaf_hashes_gives_the_same_tree(tree: MerkleTree) -> None:
    rebuilt = MerkleTree.from_leaf_hashes(b"".join(HASHES))
    assert rebuilt.size == tree.size
    for size in range(1, N + 1):
        assert rebuilt.root(size) == tree.root(size)
    assert rebuilt.inclusion_proof(37, 99) == tree.inclusion_proof(37, 99)


def test_truncate_undoes_an_append() -> None:
    tree = MerkleTree()
    tree.append(HASHES[:40])
    before = tree.root()
    tree.append(HASHES[40:])
    tree.truncate(40)
    assert tree.size == 40
    assert tree.root() == before
    tree.append(HASHES[40:])
    assert tree.root() == merkle.root_from_leaf_hashes(HASHES)


def test_tiles_touched_cover_every_new_hash() -> None:
    count = 3 * TILE_WIDTH * TILE_WIDTH // 2 + 7
    hashes = [leaf_hash(i.to_bytes(4, "big")) for i in range(count)]
    tree = MerkleTree()
    tree.append(hashes[:1000])
    tree.append(hashes[1000:])
    tiles = {(level, index): data for level, index, data in tree.tiles_touched(1000)}

    # Level 0: every tile from the one holding leaf 1000 onwards.
    assert tiles[(0, 3)] == b"".join(hashes[768:1024])
    last = (count - 1) // TILE_WIDTH
    assert tiles[(0, last)] == b"".join(hashes[last * TILE_WIDTH :])
    assert (0, 2) not in tiles

    # Level 1 holds the roots of full level-0 tiles; level 2 the roots of
    # 65536-leaf subtrees.
    level1 = tiles[(1, 0)]
    assert len(level1) == 32 * TILE_WIDTH
    assert level1[32 * 5 : 32 * 6] == merkle.root_from_leaf_hashes(
        hashes[5 * TILE_WIDTH : 6 * TILE_WIDTH]
    )
    assert tiles[(2, 0)] == merkle.root_from_leaf_hashes(hashes[: TILE_WIDTH**2])
    assert max(level for level, _ in tiles) == 2


def test_out_of_range_requests_are_refused(tree: MerkleTree) -> None:
    with pytest.raises(ValueError, match="no inclusion proof"):
        tree.inclusion_proof(N, N)
    with pytest.raises(ValueError, match="no consistency proof"):
        tree.consistency_proof(5, N + 1)
    with pytest.raises(ValueError, match="outside the tree"):
        tree.subtree_hash(0, N + 1)


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8, 13, 64, 65, 99, N])
def test_runs_of_proofs_match_single_proofs(tree: MerkleTree, size: int) -> None:
    for start in range(size):
        proofs = tree.inclusion_proofs(start, size, bytes.hex)
        for index in range(start, size):
            expected = [h.hex() for h in tree.inclusion_proof(index, size)]
            assert next(proofs) == expected, (start, index, size)
        with pytest.raises(StopIteration):
            next(proofs)
    with pytest.raises(ValueError, match="no inclusion proof"):
        next(tree.inclusion_proofs(size, size, bytes.hex))
