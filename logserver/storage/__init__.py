"""Durable storage of the log: entries, tiles and the tree state.

`open_storage` picks the backend from a database URL: `sqlite:///path` (the
embedded default) or `postgresql://...`.
"""

from __future__ import annotations

from pathlib import Path

from logserver.storage.base import (
    AuditRow,
    EntryRow,
    RequestRow,
    RequestUpdate,
    Storage,
    StorageError,
    StorageUnavailable,
    StoredState,
    TreeConflict,
)

__all__ = [
    "AuditRow",
    "EntryRow",
    "RequestRow",
    "RequestUpdate",
    "Storage",
    "StorageError",
    "StorageUnavailable",
    "StoredState",
    "TreeConflict",
    "open_storage",
]


def open_storage(url: str) -> Storage:
    """A storage backend for `url`, not yet opened."""
    if url.startswith(("postgresql://", "postgres://")):
        from logserver.storage.postgres import PostgresStorage

        return PostgresStorage(url)
    if url.startswith("sqlite:///"):
        from logserver.storage.sqlite import SqliteStorage

        return SqliteStorage(Path(url.removeprefix("sqlite:///")))
    raise ValueError(
        f"unsupported database URL {url!r}: use sqlite:///PATH or postgresql://..."
    )
