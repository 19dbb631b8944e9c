"""What the sequencer and the read path need from a storage backend."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


class StorageError(Exception):
    """The database failed in a way that retrying will not fix."""


class StorageUnavailable(StorageError):
    """The database cannot be reached right now; the caller should retry later."""


class TreeConflict(StorageError):
    """The stored tree is not the size the writer expected: another writer ran."""


@dataclass(frozen=True, slots=True)
class EntryRow:
    """One leaf as stored: its bytes and the keys it is found by."""

    leaf: bytes
    leaf_hash: bytes
    dedup_key: bytes
    artifact_sha256: bytes


@dataclass(frozen=True, slots=True)
class StoredState:
    """The durable tree: its size and root, leaf hashes, the last checkpoint."""

    size: int
    root: bytes
    leaf_hashes: bytes
    checkpoint: bytes | None


class Storage(Protocol):
    async def open(self) -> None:
        """Connect, and create or migrate the schema."""

    async def close(self) -> None: ...

    async def get_meta(self, key: str) -> str | None: ...

    async def set_meta_once(self, key: str, value: str) -> str:
        """Store `value` unless `key` has one already; return the stored value."""

    async def list_meta(self, prefix: str) -> dict[str, str]:
        """Every metadata key starting with `prefix`, with its value."""

    async def load_state(self) -> StoredState: ...

    async def find_dedup(self, keys: Sequence[bytes]) -> dict[bytes, int]:
        """The index of each already logged dedup key among `keys`."""

    async def append(
        self,
        start: int,
        entries: Sequence[EntryRow],
        tiles: Sequence[tuple[int, int, bytes]],
        root: bytes,
    ) -> None:
        """Store entries at [start, start + len), their tiles and the new root,
        in one transaction; raise `TreeConflict` if the tree is not `start` long.
        """

    async def store_checkpoint(self, size: int, checkpoint: bytes) -> None:
        """Record a signed checkpoint as the latest, if it is newer."""

    async def get_leaves(self, start: int, end: int) -> list[bytes]: ...

    async def find_leaf_hash(self, leaf_hash: bytes) -> int | None: ...

    async def find_artifact(self, sha256: bytes, limit: int) -> list[int]: ...
