"""A static tlog-tiles log written by an independent implementation, read from disk.

70,000 entries: full and partial tiles on levels 0 to 2, and checkpoints at
sizes 1, 1000 and 65536 that must prove consistent with the current one.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

import pytest

from verifier.checkpoint import (
    SignedCheckpoint,
    open_checkpoint,
    verify_checkpoint_consistency,
)
from verifier.errors import ConsistencyError, VerificationError
from verifier.merkle import (
    consistency_proof,
    fold_nodes,
    leaf_hash,
    range_nodes,
    root_from_leaf_hashes,
    verify_inclusion,
)
from verifier.note import NoteVerifier
from verifier.tiles import (
    TILE_HEIGHT,
    TILE_WIDTH,
    TileReader,
    entries_path,
    parse_entry_bundle,
    parse_hash_tile,
    parse_tile_path,
    tile_path,
    tile_width,
)

LOG = Path(__file__).parent / "vectors" / "reference-log"
VKEY = "example.com/reference-log+9805c16f+AdRRHVl2s3Mls4AxS7AItLtUMGKfKoNDewD0Q8tVWrEf"
VERIFIER = NoteVerifier.from_key(VKEY)
OLD_SIZES = [1, 1000, 65536]


def read(path: str) -> bytes:
    return (LOG / path).read_bytes()


@cache
def current() -> SignedCheckpoint:
    return open_checkpoint(read("checkpoint"), VERIFIER)


@cache
def leaf_hashes() -> tuple[bytes, ...]:
    """Every leaf hash, from the entry bundles."""
    size = current().checkpoint.size
    hashes: list[bytes] = []
    for index in range((size + TILE_WIDTH - 1) // TILE_WIDTH):
        width = tile_width(0, index, size)
        leaves = parse_entry_bundle(read(entries_path(index, width)), width)
        hashes.extend(leaf_hash(leaf) for leaf in leaves)
    return tuple(hashes)


def test_checkpoint() -> None:
    checkpoint = current().checkpoint
    assert checkpoint.origin == "example.com/reference-log"
    assert checkpoint.size == 70000
    assert checkpoint.to_text() == current().note.text


def test_every_tile_recomputed() -> None:
    size = current().checkpoint.size
    level, hashes = 0, list(leaf_hashes())
    expected_paths = set()
    while hashes:
        for index in range((len(hashes) + TILE_WIDTH - 1) // TILE_WIDTH):
            width = tile_width(level, index, size)
            path = tile_path(level, index, width)
            expected_paths.add(path)
            chunk = hashes[index * TILE_WIDTH : index * TILE_WIDTH + width]
            assert parse_hash_tile(read(path), width) == chunk, path
        # The tiles one level up hold the roots of full tiles on this level.
        hashes = [
            root_from_leaf_hashes(hashes[i : i + TILE_WIDTH])
            for i in range(0, len(hashes) - TILE_WIDTH + 1, TILE_WIDTH)
        ]
        level += 1
    assert level == 3
    tiles_on_disk = {
        str(p.relative_to(LOG))
        for p in (LOG / "tile").rglob("*")
        if p.is_file() and "/entries/" not in str(p)
    }
    assert tiles_on_disk == expected_paths
    for path in tiles_on_disk:
        assert parse_tile_path(path).path() == path


def test_root_from_leaves_and_from_tiles() -> None:
    checkpoint = current().checkpoint
    assert root_from_leaf_hashes(leaf_hashes()) == checkpoint.root_hash
    # From the tiles alone: each perfect subtree of the tree, from its tile.
    node_hashes = []
    for height, index in range_nodes(0, checkpoint.size):
        level, rest = divmod(height, TILE_HEIGHT)
        first = index << rest
        tile_index = first // TILE_WIDTH
        width = tile_width(level, tile_index, checkpoint.size)
        tile = parse_hash_tile(read(tile_path(level, tile_index, width)), width)
        start = first % TILE_WIDTH
        node_hashes.append(root_from_leaf_hashes(tile[start : start + (1 << rest)]))
    assert fold_nodes(node_hashes) == checkpoint.root_hash


@pytest.mark.parametrize("old_size", OLD_SIZES)
def test_older_checkpoints_are_consistent(old_size: int) -> None:
    old = open_checkpoint(read(f"older-checkpoints/checkpoint.{old_size}"), VERIFIER)
    assert old.checkpoint.size == old_size
    hashes = leaf_hashes()
    assert root_from_leaf_hashes(hashes[:old_size]) == old.checkpoint.root_hash
    proof = consistency_proof(hashes, old_size, current().checkpoint.size)
    verify_checkpoint_consistency(old, current(), proof)
    with pytest.raises(ConsistencyError):
        verify_checkpoint_consistency(old, current(), proof[1:])


def test_tile_reader_on_the_reference_log() -> None:
    checkpoint = current().checkpoint
    fetched: list[str] = []

    def fetch(path: str) -> bytes:
        fetched.append(path)
        return read(path)

    reader = TileReader(fetch, checkpoint.size, checkpoint.root_hash)
    hashes = leaf_hashes()
    for old_size in OLD_SIZES:
        old = open_checkpoint(
            read(f"older-checkpoints/checkpoint.{old_size}"), VERIFIER
        )
        proof = reader.consistency_proof(old_size)
        assert proof == consistency_proof(hashes, old_size, checkpoint.size)
        verify_checkpoint_consistency(old, current(), proof)
    for index in (0, 255, 256, 65535, 65536, 69887, 69888, checkpoint.size - 1):
        proof = reader.inclusion_proof(index)
        verify_inclusion(
            hashes[index], index, checkpoint.size, proof, checkpoint.root_hash
        )
    leaves = reader.read_entry_bundle(273)
    assert len(leaves) == 112
    assert len(fetched) == len(set(fetched))


def test_tile_reader_rejects_a_forged_tile() -> None:
    checkpoint = current().checkpoint

    def fetch(path: str) -> bytes:
        data = read(path)
        if path == "tile/0/100":
            return data[:64] + bytes([data[64] ^ 1]) + data[65:]
        return data

    reader = TileReader(fetch, checkpoint.size, checkpoint.root_hash)
    reader.inclusion_proof(99 * 256)
    with pytest.raises(VerificationError):
        reader.inclusion_proof(100 * 256)
