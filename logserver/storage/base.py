"""What the sequencer and the read path need from a storage backend."""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


@dataclass(frozen=True, slots=True)
class AuditRow:
    """One policy decision as the audit table holds it; `record` is JSON."""

    time: int
    decision: str
    issuer: str
    subject: str
    rule: str | None
    request_id: str | None
    record: bytes


@dataclass(frozen=True, slots=True)
class RequestRow:
    """A parked request (quorum or ceremony); `record` is its JSON state.

    `lookup` finds the open request for a quorum group or a repeated
    submission; it is unique among rows, and cleared when the request ends
    without an entry, so that a later request can take it.
    """

    id: str
    lookup: str | None
    state: str
    expires: int
    record: bytes


# Given the row found (or None), the rows to write, in order, in the same
# transaction. It runs while the row is locked, so it must not block or await.
RequestUpdate = Callable[[RequestRow | None], Sequence[RequestRow]]


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

    async def find_dedup(
        self, wanted: Sequence[tuple[bytes, bytes]]
    ) -> dict[bytes, int]:
        """The index of each already logged dedup key among `wanted`.

        `wanted` holds (artifact SHA-256 digest, dedup key) pairs: a dedup key
        covers the artifact's digest, so an entry with that key records that
        digest, and a backend may look for the key among the digest's entries.
        """

    async def append(
        self,
        start: int,
        entries: Sequence[EntryRow],
        tiles: Sequence[tuple[int, int, bytes]],
        root: bytes,
        audit: Sequence[AuditRow] = (),
        checkpoint: tuple[int, bytes] | None = None,
    ) -> None:
        """Store entries at [start, start + len), their tiles, the new root and
        the decisions that allowed them, in one transaction; raise
        `TreeConflict` if the tree is not `start` long.

        `checkpoint` (size, note), an earlier checkpoint not yet stored, is
        stored in the same transaction, as `store_checkpoint` would.
        """

    async def store_checkpoint(self, size: int, checkpoint: bytes) -> None:
        """Record a signed checkpoint as the latest, if it is newer."""

    async def get_leaves(self, start: int, end: int) -> list[bytes]: ...

    async def find_leaf_hash(self, leaf_hash: bytes) -> int | None: ...

    async def find_artifact(self, sha256: bytes, limit: int) -> list[int]: ...

    async def append_audit(self, rows: Sequence[AuditRow]) -> None:
        """Store audit records, in order, in one transaction."""

    async def list_audit(
        self, after: int, limit: int, decision: str | None = None
    ) -> list[tuple[int, AuditRow]]:
        """Audit records with an ID above `after`, oldest first."""

    async def get_request(self, request_id: str) -> RequestRow | None: ...

    async def update_request(
        self,
        update: RequestUpdate,
        *,
        request_id: str | None = None,
        lookup: str | None = None,
    ) -> list[RequestRow]:
        """Find a request by ID or lookup, locked; write what `update` returns.

        Concurrent updates of one request (or one lookup) are serialized, on
        one server or several.
        """
