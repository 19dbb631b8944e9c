"""The log's Merkle tree held in memory, for integration and proof serving.

The tree keeps every complete subtree hash, level by level: `level[h]` holds
the hashes of the subtrees of height h, the i-th covering leaves
[i * 2**h, (i + 1) * 2**h). That is about 64 bytes a leaf, and it makes every
tile a slice and every proof a few dozen lookups. Storage holds the level-0
tiles, from which `MerkleTree.from_leaf_hashes` rebuilds the rest at start.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from hashlib import sha256
from typing import TypeVar

from verifier.merkle import EMPTY_ROOT, HASH_SIZE, node_hash
from verifier.tiles import TILE_WIDTH

TILE_HEIGHT = 8

# Proofs against old tree sizes add entries too; bound the memo's size.
_MAX_PARTIAL = 4096

T = TypeVar("T")


class MerkleTree:
    """An append-only RFC 6962 tree with every complete subtree hash stored."""

    def __init__(self) -> None:
        self._levels: list[bytearray] = [bytearray()]
        self._size = 0
        # Hashes of incomplete subtrees (on a tree's right edge), which every
        # proof for the same tree size shares; dropped when the tree changes.
        self._partial: dict[tuple[int, int], bytes] = {}

    @classmethod
    def from_leaf_hashes(cls, hashes: bytes) -> MerkleTree:
        """Rebuild a tree from its concatenated leaf hashes."""
        if len(hashes) % HASH_SIZE:
            raise ValueError("leaf hashes must be a multiple of 32 bytes long")
        tree = cls()
        tree._levels[0] = bytearray(hashes)
        tree._size = len(hashes) // HASH_SIZE
        below = tree._levels[0]
        while len(below) >= 2 * HASH_SIZE:
            level = bytearray()
            for at in range(0, len(below) - HASH_SIZE, 2 * HASH_SIZE):
                # node_hash over the adjacent pair, without splitting it.
                level += sha256(b"\x01" + below[at : at + 2 * HASH_SIZE]).digest()
            tree._levels.append(level)
            below = level
        return tree

    @property
    def size(self) -> int:
        return self._size

    def append(self, leaf_hashes: Iterable[bytes]) -> None:
        """Add leaves, completing every subtree that each new leaf closes."""
        levels = self._levels
        self._partial.clear()
        for leaf in leaf_hashes:
            levels[0] += leaf
            self._size += 1
            index, height = self._size - 1, 0
            while index & 1:
                pair = levels[height][-2 * HASH_SIZE :]
                height += 1
                index >>= 1
                if height == len(levels):
                    levels.append(bytearray())
                levels[height] += sha256(b"\x01" + pair).digest()

    def truncate(self, size: int) -> None:
        """Drop leaves past `size`: undoes an append whose storage write failed."""
        if not 0 <= size <= self._size:
            raise ValueError(f"cannot truncate a tree of {self._size} to {size}")
        for height, level in enumerate(self._levels):
            del level[(size >> height) * HASH_SIZE :]
        self._size = size
        self._partial.clear()

    def node(self, height: int, index: int) -> bytes:
        """The hash of the complete subtree of `height` at position `index`."""
        at = index * HASH_SIZE
        return bytes(self._levels[height][at : at + HASH_SIZE])

    def leaf_hash(self, index: int) -> bytes:
        return self.node(0, index)

    def subtree_hash(self, start: int, end: int) -> bytes:
        """MTH(D[start:end]) for a range of leaves already in the tree."""
        if not 0 <= start <= end <= self._size:
            raise ValueError(f"range [{start}, {end}) is outside the tree")
        if start == end:
            return EMPTY_ROOT
        size = end - start
        height = size.bit_length() - 1
        if size == 1 << height and start % size == 0:
            return self.node(height, start >> height)
        cached = self._partial.get((start, end))
        if cached is None:
            split = 1 << ((size - 1).bit_length() - 1)
            cached = node_hash(
                self.subtree_hash(start, start + split),
                self.subtree_hash(start + split, end),
            )
            if len(self._partial) > _MAX_PARTIAL:
                self._partial.clear()
            self._partial[(start, end)] = cached
        return cached

    def root(self, size: int | None = None) -> bytes:
        return self.subtree_hash(0, self._size if size is None else size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """PATH(m, D[0:n]), RFC 9162 section 2.1.3.1.

        Walked bottom up: at each height the sibling of the subtree holding
        the leaf is a stored node, or, on the right edge, an incomplete
        subtree (memoized); a sibling past the end of the tree is skipped,
        as the RFC's left-balanced tree has no node there.
        """
        if not 0 <= index < size <= self._size:
            raise ValueError(f"no inclusion proof for leaf {index} in a tree of {size}")
        proof: list[bytes] = []
        height = 0
        while (1 << height) < size:
            sibling = (index >> height) ^ 1
            start = sibling << height
            if start < size:
                end = start + (1 << height)
                if end <= size:
                    proof.append(self.node(height, sibling))
                else:
                    proof.append(self.subtree_hash(start, size))
            height += 1
        return proof

    def inclusion_proofs(
        self, start: int, size: int, encode: Callable[[bytes], T]
    ) -> Iterator[list[T]]:
        """PATH(m, D[0:size]) for m = start, start + 1, ... up to size - 1,
        each hash passed through `encode`; stop consuming when done.

        Leaves m - 1 and m have the same sibling at every height above the
        highest bit in which m - 1 and m differ, so each proof after the
        first recomputes about two heights rather than all of them: the
        proofs of a batch's consecutive entries cost little more than one.
        """
        if not 0 <= start < size <= self._size:
            raise ValueError(f"no inclusion proof for leaf {start} in a tree of {size}")
        heights = (size - 1).bit_length()  # the heights h with 2**h < size
        path: list[T | None] = [None] * heights
        changed = heights
        for index in range(start, size):
            for height in range(changed):
                sibling = (index >> height) ^ 1
                first = sibling << height
                if first >= size:
                    # Past the end of the tree: the RFC's tree has no node there.
                    path[height] = None
                elif first + (1 << height) <= size:
                    path[height] = encode(self.node(height, sibling))
                else:
                    path[height] = encode(self.subtree_hash(first, size))
            yield [h for h in path if h is not None]
            changed = min(heights, (index ^ (index + 1)).bit_length())

    def consistency_proof(self, old_size: int, new_size: int) -> list[bytes]:
        """PROOF(m, D[0:n]), RFC 9162 section 2.1.4.1."""
        if not 0 <= old_size <= new_size <= self._size:
            raise ValueError(
                f"no consistency proof from {old_size} to {new_size} "
                f"in a tree of {self._size}"
            )
        if old_size in (0, new_size):
            return []
        proof: list[bytes] = []
        start, end, whole = 0, new_size, True
        # SUBPROOF(m, D[start:end], whole), unrolled; siblings collected top
        # down and reversed at the end, as for inclusion.
        while True:
            size = end - start
            if old_size - start == size:
                if not whole:
                    proof.append(self.subtree_hash(start, end))
                break
            split = 1 << ((size - 1).bit_length() - 1)
            if old_size - start <= split:
                proof.append(self.subtree_hash(start + split, end))
                end = start + split
            else:
                proof.append(self.subtree_hash(start, start + split))
                start, whole = start + split, False
        proof.reverse()
        return proof

    def tile(self, level: int, index: int, width: int) -> bytes:
        """The first `width` hashes of tile (level, index): tree nodes of height 8L."""
        height = level * TILE_HEIGHT
        if height >= len(self._levels):
            return b""
        at = index * TILE_WIDTH * HASH_SIZE
        return bytes(self._levels[height][at : at + width * HASH_SIZE])

    def tiles_touched(self, old_size: int) -> Iterator[tuple[int, int, bytes]]:
        """(level, index, data) of every tile that grew since `old_size`."""
        level = 0
        while True:
            height = level * TILE_HEIGHT
            old_count, new_count = old_size >> height, self._size >> height
            if new_count == 0 or old_count == new_count:
                return
            for index in range(
                old_count // TILE_WIDTH, (new_count - 1) // TILE_WIDTH + 1
            ):
                width = min(TILE_WIDTH, new_count - index * TILE_WIDTH)
                yield level, index, self.tile(level, index, width)
            level += 1
