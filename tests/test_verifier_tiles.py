"""Tile paths, hash tiles, entry bundles and reading proofs from untrusted tiles."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from verifier.errors import FormatError, VerificationError
from verifier.merkle import (
    EMPTY_ROOT,
    consistency_proof,
    inclusion_proof,
    leaf_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from verifier.tiles import (
    MAX_LEVEL,
    MAX_TILE_INDEX,
    TILE_WIDTH,
    TilePath,
    TileReader,
    encode_entry_bundle,
    entries_path,
    format_index,
    parse_entry_bundle,
    parse_hash_tile,
    parse_tile_path,
    tile_path,
    tile_width,
)

VECTORS: dict[str, Any] = json.loads(
    (Path(__file__).parent / "vectors" / "tlog-vectors.json").read_text()
)


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "000"),
        (5, "005"),
        (999, "999"),
        (1000, "x001/000"),
        (1234067, "x001/x234/067"),
        (MAX_TILE_INDEX, "x072/x057/x594/x037/x927/935"),
    ],
)
def test_format_index(n: int, text: str) -> None:
    assert format_index(n) == text


def test_paths() -> None:
    assert tile_path(0, 1234067) == "tile/0/x001/x234/067"
    assert tile_path(0, 1234067, 7) == "tile/0/x001/x234/067.p/7"
    assert tile_path(2, 0, 1) == "tile/2/000.p/1"
    assert tile_path(63, 0, 255) == "tile/63/000.p/255"
    assert entries_path(5) == "tile/entries/005"
    assert entries_path(273, 112) == "tile/entries/273.p/112"


def test_go_sumdb_paths_in_c2sp_layout() -> None:
    # The old layout has an extra "8/" and calls entry bundles "data".
    for old in VECTORS["sumdb_tile_paths"]:
        new = old.replace("tile/8/data/", "tile/entries/").replace("tile/8/", "tile/")
        tile = parse_tile_path(new)
        assert tile.path() == new
    assert parse_tile_path("tile/0/x001/x234/067.p/7") == TilePath(0, 1234067, 7)
    assert parse_tile_path("tile/entries/005") == TilePath(None, 5, TILE_WIDTH)
    assert parse_tile_path("tile/2/000.p/1") == TilePath(2, 0, 1)


@pytest.mark.parametrize(
    "path",
    [
        "",
        "tile",
        "tile/0",
        "tile/0/",
        "tile/0/5",
        "tile/0/05",
        "tile/0/0005",
        "tile/00/005",
        "tile/01/005",
        "tile/64/000",
        "tile/99/000",
        "tile/100/000",
        "tile/-1/000",
        "tile/+1/000",
        "tile/x/000",
        "tile/data/000",
        "tile/8/0/000",
        "tile/0/x000/001",
        "tile/0/x001",
        "tile/0/x001/",
        "tile/0/001/002",
        "tile/0/x1/002",
        "tile/0/X001/002",
        "tile/0/x001//002",
        "tile//0/000",
        "/tile/0/000",
        "tile/0/000/",
        "tile/0/000.p/0",
        "tile/0/000.p/256",
        "tile/0/000.p/300",
        "tile/0/000.p/05",
        "tile/0/000.p/",
        "tile/0/000.p",
        "tile/0/000.p/5/",
        "tile/0/000.P/5",
        "tile/0/000.p/\u0665",
        "tile/0/\u0660\u0660\u0665",
        "tile/0/../000",
        "tile/../0/000",
        "tile/0/./000",
        "tile/0/000\n",
        " tile/0/000",
        "tile/0/x072/x057/x594/x037/x927/936",
        "tile/0/x999/x999/x999/x999/x999/999",
        "tile/0/x001/x001/x001/x001/x001/x001/001",
        "tile/entries/x001/000.p/256",
        "tile/entries/000.p/0",
    ],
)
def test_malformed_tile_paths(path: str) -> None:
    with pytest.raises(FormatError):
        parse_tile_path(path)


@given(
    st.one_of(st.none(), st.integers(0, MAX_LEVEL)),
    st.integers(0, MAX_TILE_INDEX),
    st.integers(1, TILE_WIDTH),
)
def test_tile_path_round_trip(level: int | None, index: int, width: int) -> None:
    tile = TilePath(level, index, width)
    assert parse_tile_path(tile.path()) == tile


@given(st.text(max_size=80))
def test_parse_tile_path_only_raises_format_error(path: str) -> None:
    for candidate in (path, "tile/0/" + path, "tile/entries/" + path):
        with contextlib.suppress(FormatError):
            parse_tile_path(candidate)


@given(st.text(alphabet="tile/entrx0123456789.p", max_size=40))
def test_parse_tile_path_near_misses(path: str) -> None:
    try:
        tile = parse_tile_path(path)
    except FormatError:
        return
    assert tile.path() == path


def test_path_misuse_is_value_error() -> None:
    calls: list[Callable[[], object]] = [
        lambda: format_index(-1),
        lambda: format_index(MAX_TILE_INDEX + 1),
        lambda: tile_path(64, 0),
        lambda: tile_path(-1, 0),
        lambda: tile_path(0, 0, 0),
        lambda: tile_path(0, 0, 257),
        lambda: entries_path(0, 0),
    ]
    for call in calls:
        with pytest.raises(ValueError):
            call()


def test_entry_bundles() -> None:
    leaves = [b"", b"a", b"\x00" * 65535, bytes(range(256))]
    data = encode_entry_bundle(leaves)
    assert data[:5] == b"\x00\x00\x00\x01a"
    assert parse_entry_bundle(data) == leaves
    assert parse_entry_bundle(data, 4) == leaves
    full = [b"%d" % i for i in range(TILE_WIDTH)]
    assert parse_entry_bundle(encode_entry_bundle(full), TILE_WIDTH) == full
    for count in (1, 3, 5):
        with pytest.raises(FormatError):
            parse_entry_bundle(data, count)
    with pytest.raises(ValueError):
        parse_entry_bundle(data, 0)
    with pytest.raises(ValueError):
        encode_entry_bundle([b"x" * 65536])
    with pytest.raises(ValueError):
        encode_entry_bundle([])
    with pytest.raises(ValueError):
        encode_entry_bundle([b""] * (TILE_WIDTH + 1))


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00", b"\x00\x02a", b"\x00\x01a\x00", b"\x00\x01ab", b"\x00\x00" * 257],
)
def test_malformed_entry_bundles(data: bytes) -> None:
    with pytest.raises(FormatError):
        parse_entry_bundle(data)


@given(st.binary(max_size=300), st.one_of(st.none(), st.integers(1, TILE_WIDTH)))
def test_parse_entry_bundle_only_raises_format_error(
    data: bytes, count: int | None
) -> None:
    with contextlib.suppress(FormatError):
        leaves = parse_entry_bundle(data, count)
        assert encode_entry_bundle(leaves) == data


@given(st.lists(st.binary(max_size=300), min_size=1, max_size=TILE_WIDTH))
def test_entry_bundle_round_trip(leaves: list[bytes]) -> None:
    assert parse_entry_bundle(encode_entry_bundle(leaves), len(leaves)) == leaves


def test_hash_tiles() -> None:
    hashes = [bytes([i]) * 32 for i in range(3)]
    assert parse_hash_tile(b"".join(hashes), 3) == hashes
    for data in (b"", b"".join(hashes)[:-1], b"".join(hashes) + b"\x00"):
        with pytest.raises(FormatError):
            parse_hash_tile(data, 3)
    with pytest.raises(FormatError):
        parse_hash_tile(b"".join(hashes), 4)
    with pytest.raises(ValueError):
        parse_hash_tile(b"", 0)


@given(st.binary(max_size=200), st.integers(1, TILE_WIDTH))
def test_parse_hash_tile_only_raises_format_error(data: bytes, width: int) -> None:
    with contextlib.suppress(FormatError):
        parse_hash_tile(data, width)


@pytest.mark.parametrize(
    ("level", "index", "size", "width"),
    [
        (0, 0, 0, 0),
        (0, 0, 1, 1),
        (0, 0, 256, 256),
        (0, 1, 256, 0),
        (0, 1, 300, 44),
        (0, 273, 70000, 112),
        (0, 272, 70000, 256),
        (1, 0, 70000, 256),
        (1, 1, 70000, 17),
        (2, 0, 70000, 1),
        (3, 0, 70000, 0),
        (1, 0, 255, 0),
        (1, 0, 256, 1),
        (7, 0, 1 << 56, 1),
        (7, 0, (1 << 64) - 1, 255),
    ],
)
def test_tile_width(level: int, index: int, size: int, width: int) -> None:
    assert tile_width(level, index, size) == width


def build_tiles(leaves: list[bytes]) -> dict[str, bytes]:
    """Every tile and entry bundle of the tree of these leaves, by path."""
    tiles: dict[str, bytes] = {}
    for start in range(0, len(leaves), TILE_WIDTH):
        bundle = leaves[start : start + TILE_WIDTH]
        tiles[entries_path(start // TILE_WIDTH, len(bundle))] = encode_entry_bundle(
            bundle
        )
    hashes = [leaf_hash(leaf) for leaf in leaves]
    level = 0
    while hashes:
        for start in range(0, len(hashes), TILE_WIDTH):
            chunk = hashes[start : start + TILE_WIDTH]
            tiles[tile_path(level, start // TILE_WIDTH, len(chunk))] = b"".join(chunk)
        hashes = [
            root_from_leaf_hashes(hashes[i : i + TILE_WIDTH])
            for i in range(0, len(hashes) - TILE_WIDTH + 1, TILE_WIDTH)
        ]
        level += 1
    return tiles


BIG = 65536 + 257
LEAVES = [b"entry %d" % i for i in range(BIG)]
HASHES = [leaf_hash(leaf) for leaf in LEAVES]


@cache
def tiles_up_to(size: int) -> dict[str, bytes]:
    return build_tiles(LEAVES[:size])


@cache
def root(size: int) -> bytes:
    return root_from_leaf_hashes(HASHES[:size])


class Source:
    """A dict of tiles that counts what was fetched."""

    def __init__(self, tiles: dict[str, bytes]) -> None:
        self.tiles = dict(tiles)
        self.fetched: Counter[str] = Counter()

    def __call__(self, path: str) -> bytes:
        self.fetched[path] += 1
        return self.tiles[path]


@pytest.mark.parametrize("size", [1, 2, 3, 255, 256, 257, 300, 511, 512, 513, 1000])
def test_reader_proofs_match_reference(size: int) -> None:
    source = Source(tiles_up_to(size))
    reader = TileReader(source, size, root(size))
    # Every index and old size on small trees; a sample on the larger ones.
    sample = [*range(0, size, 1 if size <= 300 else 13), size - 1]
    for index in sample:
        proof = reader.inclusion_proof(index)
        assert proof == inclusion_proof(HASHES, index, size)
        verify_inclusion(HASHES[index], index, size, proof, root(size))
    for old in [0, *sample, size]:
        proof = reader.consistency_proof(old)
        assert proof == consistency_proof(HASHES, old, size)
        verify_consistency(old, size, root(old), root(size), proof)
    for bundle in range((size + TILE_WIDTH - 1) // TILE_WIDTH):
        assert (
            reader.read_entry_bundle(bundle)
            == LEAVES[bundle * 256 : (bundle + 1) * 256][: size - bundle * 256]
        )
    # Every tile is fetched once, and only tiles of this tree size.
    assert max(source.fetched.values()) == 1
    assert set(source.fetched) <= set(tiles_up_to(size))


@pytest.mark.parametrize("size", [65535, 65536, 65537, BIG])
def test_reader_on_three_levels(size: int) -> None:
    source = Source(tiles_up_to(size))
    reader = TileReader(source, size, root(size))
    for index in (0, 255, 256, 65535 % size, size - 1):
        proof = reader.inclusion_proof(index)
        verify_inclusion(HASHES[index], index, size, proof, root(size))
    for old in (1, 256, 1000, 65535, 65536):
        if old <= size:
            proof = reader.consistency_proof(old)
            verify_consistency(old, size, root(old), root(size), proof)
    assert reader.hash_at(0, size - 1) == HASHES[size - 1]
    assert reader.hash_at(8, 0) == root(256)
    assert reader.range_hash(0, size) == root(size)
    assert max(source.fetched.values()) == 1


def test_reader_of_empty_tree() -> None:
    reader = TileReader(Source({}), 0, EMPTY_ROOT)
    assert reader.consistency_proof(0) == []
    with pytest.raises(ValueError):
        reader.hash_at(0, 0)
    with pytest.raises(VerificationError):
        TileReader(Source({}), 0, root(1)).consistency_proof(0)


def test_reader_rejects_a_wrong_root() -> None:
    reader = TileReader(Source(tiles_up_to(1000)), 1000, root(999))
    with pytest.raises(VerificationError):
        reader.hash_at(0, 0)


def tamper(tiles: dict[str, bytes], path: str) -> dict[str, bytes]:
    tiles = dict(tiles)
    data = bytearray(tiles[path])
    data[len(data) // 2] ^= 1
    tiles[path] = bytes(data)
    return tiles


@pytest.mark.parametrize(
    ("path", "node"),
    [
        ("tile/0/000", (0, 3)),  # a full tile, checked against its parent
        ("tile/0/255", (0, 255 * 256)),
        ("tile/1/000", (0, 3)),  # a full parent: its children cannot be checked
        ("tile/0/257.p/1", (0, 0)),  # the partial edge: checked against the root
        ("tile/1/001.p/1", (0, 0)),
        ("tile/2/000.p/1", (0, 0)),
    ],
)
def test_reader_rejects_tampered_tiles(path: str, node: tuple[int, int]) -> None:
    size = BIG
    tiles = tamper(tiles_up_to(size), path)
    reader = TileReader(Source(tiles), size, root(size))
    with pytest.raises(VerificationError):
        reader.hash_at(*node)


def test_reader_does_not_keep_a_tile_that_failed() -> None:
    good = tiles_up_to(1000)
    source = Source(tamper(good, "tile/0/001"))
    reader = TileReader(source, 1000, root(1000))
    with pytest.raises(VerificationError):
        reader.hash_at(0, 300)
    source.tiles = dict(good)
    assert reader.hash_at(0, 300) == HASHES[300]


@pytest.mark.parametrize("max_tiles", [0, 1, 2, 16])
def test_reader_cache_is_bounded(max_tiles: int) -> None:
    """More tiles than the cache holds are read, and read right, in any order.

    The cache never holds more than its bound, and no tile is fetched while
    it is still in the cache.
    """
    size = BIG
    fetched: Counter[str] = Counter()

    def fetch(path: str) -> bytes:
        tile = parse_tile_path(path)
        assert (tile.level, tile.index) not in reader._tiles, path
        fetched[path] += 1
        return tiles_up_to(size)[path]

    reader = TileReader(fetch, size, root(size), max_tiles)
    bundles = [*range(0, 257, 7), *range(256, -1, -5), 3, 3, 3]
    for bundle in bundles:
        index = bundle * TILE_WIDTH + 17
        assert reader.hash_at(0, index) == HASHES[index]
        assert len(reader._tiles) <= max_tiles
    # One batch of more tiles than the cache holds.
    nodes = [(0, bundle * TILE_WIDTH) for bundle in range(0, 257, 3)]
    assert reader.read_hashes(nodes) == [HASHES[i] for _, i in nodes]
    assert len(reader._tiles) <= max_tiles
    proof = reader.inclusion_proof(1234)
    verify_inclusion(HASHES[1234], 1234, size, proof, root(size))
    assert len(reader._tiles) <= max_tiles
    # The partial tiles on the right edge are checked and fetched once only.
    assert all(fetched[p] == 1 for p in fetched if ".p/" in p)
    # Bundle 3's tile, read three times in a row and then in the batch, is
    # fetched once if anything is cached at all.
    assert fetched["tile/0/003"] == (1 if max_tiles else 4)


def test_reader_cache_keeps_the_most_recently_used_tiles() -> None:
    size = BIG
    source = Source(tiles_up_to(size))
    reader = TileReader(source, size, root(size), max_tiles=4)
    # tile/1/000 (the parent of every full level 0 tile) and three of those.
    for bundle in (0, 1, 2):
        reader.hash_at(0, bundle * TILE_WIDTH)
    assert source.fetched["tile/1/000"] == 1
    reader.hash_at(0, 0)  # bundle 0's tile is now the most recently used
    reader.hash_at(0, 3 * TILE_WIDTH)  # so bundle 1's tile is dropped
    assert len(reader._tiles) == 4
    for bundle in (0, 2, 3):
        reader.hash_at(0, bundle * TILE_WIDTH + 1)
    assert source.fetched["tile/0/000"] == 1
    assert source.fetched["tile/0/002"] == 1
    assert source.fetched["tile/0/003"] == 1
    assert source.fetched["tile/1/000"] == 1
    reader.hash_at(0, 1 * TILE_WIDTH)  # dropped: fetched and checked again
    assert source.fetched["tile/0/001"] == 2


def test_reader_cache_bound_defaults_and_must_not_be_negative() -> None:
    assert TileReader(Source({}), 0, EMPTY_ROOT).max_tiles == 1024
    with pytest.raises(ValueError, match="negative"):
        TileReader(Source({}), 0, EMPTY_ROOT, max_tiles=-1)


def test_reader_rejects_bad_entry_bundles_and_short_tiles() -> None:
    tiles = tiles_up_to(1000)
    forged = dict(tiles)
    forged["tile/entries/001"] = encode_entry_bundle([b"forged", *LEAVES[257:512]])
    with pytest.raises(VerificationError):
        TileReader(Source(forged), 1000, root(1000)).read_entry_bundle(1)
    short = dict(tiles)
    short["tile/0/001"] = tiles["tile/0/001"][:-32]
    with pytest.raises(FormatError):
        TileReader(Source(short), 1000, root(1000)).hash_at(0, 300)
