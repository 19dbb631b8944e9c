"""Tiled logs, c2sp.org/tlog-tiles: tile paths, hash tiles and entry bundles.

A level L tile holds up to 256 consecutive tree hashes of height 8 * L; a
level 0 tile holds leaf hashes and the entry bundle at the same index holds
the leaves themselves. `TileReader` reads hashes from a source it does not
trust, checking every tile against a trusted root hash before using it.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from verifier.errors import FormatError, VerificationError
from verifier.merkle import (
    EMPTY_ROOT,
    HASH_SIZE,
    Node,
    consistency_proof_ranges,
    fold_nodes,
    inclusion_proof_ranges,
    leaf_hash,
    range_nodes,
    root_from_leaf_hashes,
)

TILE_HEIGHT = 8
TILE_WIDTH = 1 << TILE_HEIGHT
MAX_LEVEL = 63
MAX_TILE_INDEX = (1 << 56) - 1
MAX_ENTRY_SIZE = 0xFFFF
MAX_BUNDLE_SIZE = TILE_WIDTH * (2 + MAX_ENTRY_SIZE)
# Checked full tiles a TileReader keeps (8 KiB of hashes each) by default.
DEFAULT_CACHED_TILES = 1024

_MAX_PATH_LENGTH = 64
_TILE_PATH = re.compile(
    r"tile/(?:(?P<entries>entries)|(?P<level>[0-9]{1,2}))"
    r"/(?P<index>(?:x[0-9]{3}/){0,5}[0-9]{3})"
    r"(?:\.p/(?P<width>[0-9]{1,3}))?"
)


def format_index(n: int) -> str:
    """A tile index in 3-digit groups, all but the last prefixed with x.

    1234067 is "x001/x234/067" and 5 is "005".
    """
    if not 0 <= n <= MAX_TILE_INDEX:
        raise ValueError(f"tile index {n} is out of range")
    digits = str(n)
    digits = digits.zfill(-(-len(digits) // 3) * 3)
    groups = [digits[i : i + 3] for i in range(0, len(digits), 3)]
    return "/".join(["x" + g for g in groups[:-1]] + groups[-1:])


def _suffix(width: int) -> str:
    if not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"tile width {width} is out of range")
    return "" if width == TILE_WIDTH else f".p/{width}"


def tile_path(level: int, index: int, width: int = TILE_WIDTH) -> str:
    """`tile/<L>/<N>[.p/<W>]`, the hash tile at level L and index N."""
    if not 0 <= level <= MAX_LEVEL:
        raise ValueError(f"tile level {level} is out of range")
    return f"tile/{level}/{format_index(index)}{_suffix(width)}"


def entries_path(index: int, width: int = TILE_WIDTH) -> str:
    """`tile/entries/<N>[.p/<W>]`, the entry bundle at index N."""
    return f"tile/entries/{format_index(index)}{_suffix(width)}"


@dataclass(frozen=True)
class TilePath:
    """A parsed tile path; a level of None names an entry bundle."""

    level: int | None
    index: int
    width: int

    def path(self) -> str:
        """The canonical path text."""
        if self.level is None:
            return entries_path(self.index, self.width)
        return tile_path(self.level, self.index, self.width)


def parse_tile_path(path: str) -> TilePath:
    """Parse `tile/<L>/<N>[.p/<W>]` or `tile/entries/<N>[.p/<W>]` strictly."""
    match = _TILE_PATH.fullmatch(path) if len(path) <= _MAX_PATH_LENGTH else None
    if match is None:
        raise FormatError("malformed tile path")
    level = None if match["entries"] else int(match["level"])
    index = int(match["index"].replace("x", "").replace("/", ""))
    width = TILE_WIDTH if match["width"] is None else int(match["width"])
    try:
        tile = TilePath(level, index, width)
        canonical = tile.path()
    except ValueError as e:
        raise FormatError("tile path out of range") from e
    # Leading zeros, an empty x000 group or an explicit .p/256 do not format back.
    if canonical != path:
        raise FormatError("non-canonical tile path")
    return tile


def encode_entry_bundle(leaves: Sequence[bytes]) -> bytes:
    """Each leaf as a big-endian uint16 length and its bytes."""
    if not 1 <= len(leaves) <= TILE_WIDTH:
        raise ValueError(f"an entry bundle holds 1 to {TILE_WIDTH} entries")
    out = bytearray()
    for leaf in leaves:
        if len(leaf) > MAX_ENTRY_SIZE:
            raise ValueError(f"entry is larger than {MAX_ENTRY_SIZE} bytes")
        out += len(leaf).to_bytes(2, "big") + leaf
    return bytes(out)


def parse_entry_bundle(data: bytes, count: int | None = None) -> list[bytes]:
    """Parse an entry bundle strictly; with `count`, it must hold exactly that many."""
    if count is not None and not 1 <= count <= TILE_WIDTH:
        raise ValueError(f"an entry bundle holds 1 to {TILE_WIDTH} entries")
    if len(data) > MAX_BUNDLE_SIZE:
        raise FormatError("entry bundle is too large")
    limit = TILE_WIDTH if count is None else count
    leaves: list[bytes] = []
    pos = 0
    while pos < len(data):
        if len(leaves) == limit:
            raise FormatError("entry bundle has too many entries")
        if pos + 2 > len(data):
            raise FormatError("entry bundle is truncated")
        size = int.from_bytes(data[pos : pos + 2], "big")
        pos += 2
        if pos + size > len(data):
            raise FormatError("entry bundle is truncated")
        leaves.append(data[pos : pos + size])
        pos += size
    if not leaves or (count is not None and len(leaves) != count):
        raise FormatError("entry bundle has too few entries")
    return leaves


def parse_hash_tile(data: bytes, width: int) -> list[bytes]:
    """Split a hash tile of `width` hashes; it must be exactly width * 32 bytes."""
    if not 1 <= width <= TILE_WIDTH:
        raise ValueError(f"tile width {width} is out of range")
    if len(data) != width * HASH_SIZE:
        raise FormatError(f"hash tile is not {width} hashes")
    return [data[i : i + HASH_SIZE] for i in range(0, len(data), HASH_SIZE)]


def tile_width(level: int, index: int, tree_size: int) -> int:
    """How many hashes tile (level, index) holds in a tree of tree_size.

    0 if the tile does not exist yet, TILE_WIDTH if it is full.
    """
    if level < 0 or index < 0 or tree_size < 0:
        raise ValueError("tile level, index and tree size must not be negative")
    hashes = tree_size >> (TILE_HEIGHT * level)
    return max(0, min(TILE_WIDTH, hashes - index * TILE_WIDTH))


# A hash tile by (level, index); its width follows from the tree size.
TileKey = tuple[int, int]


def _tile_of(node: Node) -> tuple[TileKey, int, int]:
    """The tile holding the hashes below `node`, and their slice in it."""
    height, index = node
    level, rest = divmod(height, TILE_HEIGHT)
    first = index << rest
    start = first % TILE_WIDTH
    return (level, first // TILE_WIDTH), start, start + (1 << rest)


def _node_hash(tiles: dict[TileKey, list[bytes]], node: Node) -> bytes:
    key, start, end = _tile_of(node)
    return root_from_leaf_hashes(tiles[key][start:end])


class TileReader:
    """Tree hashes and proofs read from tiles that are not trusted.

    Every tile is checked before it is used or kept: the partial tiles on
    the right edge of the tree must hash to the trusted root, and a full
    tile must hash to its parent hash in a checked tile one level up.
    `fetch` takes a tile path such as "tile/0/x001/067" and returns its bytes.

    Checked tiles are kept so that they are not fetched again: the partial
    tiles of the right edge (at most one per level) for as long as the
    reader lives, and up to `max_tiles` full tiles, the least recently used
    dropped first. A dropped tile is fetched and checked again if needed.
    """

    def __init__(
        self,
        fetch: Callable[[str], bytes],
        tree_size: int,
        root_hash: bytes,
        max_tiles: int = DEFAULT_CACHED_TILES,
    ) -> None:
        if not 0 <= tree_size <= (1 << 64) - 1:
            raise ValueError(f"tree size {tree_size} is out of range")
        if len(root_hash) != HASH_SIZE:
            raise ValueError("root hash must be 32 bytes")
        if max_tiles < 0:
            raise ValueError(f"max_tiles {max_tiles} is negative")
        self._fetch = fetch
        self.tree_size = tree_size
        self.root_hash = root_hash
        self.max_tiles = max_tiles
        self._edge: dict[TileKey, list[bytes]] = {}
        self._tiles: OrderedDict[TileKey, list[bytes]] = OrderedDict()
        self._edge_checked = False

    def hash_at(self, height: int, index: int) -> bytes:
        """The hash of the perfect subtree of `height` at `index`."""
        return self.read_hashes([(height, index)])[0]

    def read_hashes(self, nodes: Sequence[Node]) -> list[bytes]:
        """The hashes of perfect subtrees (height, index), read in one batch."""
        for height, index in nodes:
            if height < 0 or index < 0 or (index + 1) << height > self.tree_size:
                raise ValueError(f"no node ({height}, {index}) in the tree")
        tiles = self._load(_tile_of(node)[0] for node in nodes)
        return [_node_hash(tiles, node) for node in nodes]

    def range_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a range that is a subtree of the tree."""
        return fold_nodes(self.read_hashes(range_nodes(start, end)))

    def inclusion_proof(self, index: int) -> list[bytes]:
        """PATH(index, D[tree_size]), RFC 9162 section 2.1.3.1."""
        return self._proof(inclusion_proof_ranges(index, self.tree_size))

    def consistency_proof(self, old_size: int) -> list[bytes]:
        """PROOF(old_size, D[tree_size]), RFC 9162 section 2.1.4.1."""
        return self._proof(consistency_proof_ranges(old_size, self.tree_size))

    def read_entry_bundle(self, index: int) -> list[bytes]:
        """The entries of bundle `index`, checked against the leaf hashes."""
        width = tile_width(0, index, self.tree_size)
        if width == 0:
            raise ValueError(f"no entry bundle {index} in the tree")
        leaves = parse_entry_bundle(self._fetch(entries_path(index, width)), width)
        first = index * TILE_WIDTH
        hashes = self.read_hashes([(0, first + i) for i in range(width)])
        if [leaf_hash(leaf) for leaf in leaves] != hashes:
            raise VerificationError("entry bundle does not match the tree")
        return leaves

    def _proof(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        plans = [range_nodes(start, end) for start, end in ranges]
        hashes = iter(self.read_hashes([node for plan in plans for node in plan]))
        return [fold_nodes([next(hashes) for _ in plan]) for plan in plans]

    def _read_tile(self, key: TileKey) -> list[bytes]:
        level, index = key
        width = tile_width(level, index, self.tree_size)
        return parse_hash_tile(self._fetch(tile_path(level, index, width)), width)

    def _cached(self, key: TileKey) -> list[bytes] | None:
        hashes = self._edge.get(key)
        if hashes is None:
            hashes = self._tiles.get(key)
            if hashes is not None:
                self._tiles.move_to_end(key)
        return hashes

    def _keep(self, key: TileKey, hashes: list[bytes]) -> None:
        self._tiles[key] = hashes
        while len(self._tiles) > self.max_tiles:
            self._tiles.popitem(last=False)

    def _load(self, keys: Iterable[TileKey]) -> dict[TileKey, list[bytes]]:
        """The checked tiles with these keys, and the tiles above them.

        1. Check the right edge once: its partial tiles must give the root.
        2. Add, for every full tile not kept, the tiles above it up to a
           kept or partial one.
        3. Check and keep the full tiles top down, each against its parent.

        The tiles are returned too, so that a batch larger than the cache
        can be answered: a tile dropped from the cache is still here.
        """
        # 1.
        if not self._edge_checked:
            self._check_edge()
        # 2.
        tiles: dict[TileKey, list[bytes]] = {}
        wanted: set[TileKey] = set()
        for key in keys:
            while key not in tiles and key not in wanted:
                hashes = self._cached(key)
                if hashes is not None:
                    tiles[key] = hashes
                    break
                wanted.add(key)
                key = (key[0] + 1, key[1] // TILE_WIDTH)
        # 3.
        for key in sorted(wanted, reverse=True):
            level, index = key
            parent = tiles[(level + 1, index // TILE_WIDTH)]
            hashes = self._read_tile(key)
            if root_from_leaf_hashes(hashes) != parent[index % TILE_WIDTH]:
                raise VerificationError("tile does not match the tree")
            tiles[key] = hashes
            self._keep(key, hashes)
        return tiles

    def _check_edge(self) -> None:
        edge: dict[TileKey, list[bytes]] = {}
        level = 0
        while self.tree_size >> (TILE_HEIGHT * level):
            index = (self.tree_size >> (TILE_HEIGHT * level)) // TILE_WIDTH
            if tile_width(level, index, self.tree_size):
                edge[(level, index)] = self._read_tile((level, index))
            level += 1
        nodes = range_nodes(0, self.tree_size) if self.tree_size else []
        hashes = []
        for node in nodes:
            key, start, end = _tile_of(node)
            hashes.append(root_from_leaf_hashes(edge[key][start:end]))
        root = fold_nodes(hashes) if hashes else EMPTY_ROOT
        if root != self.root_hash:
            raise VerificationError("tiles do not match the tree root")
        self._edge = edge
        self._edge_checked = True
