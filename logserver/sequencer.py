"""Sequencing and integration: from queued submissions to a signed checkpoint.

Submissions wait in a bounded queue. Two stages drain it in batches:

1. signing takes every queued submission, drops those already in the log,
   signs the rest's digests and builds their leaves;
2. integration appends the leaves to the tree, stores entries, tiles and the
   new tree state in one transaction, and only then signs a checkpoint over
   the durable state, stores it, and answers every submission of the batch.

The stages run concurrently, so one batch is signed while the one before it
is written. A checkpoint is only ever signed for a tree that storage has
committed, and the tree only grows, so no two checkpoints can disagree.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from logserver.errors import PayloadTooLarge, Unavailable, Unprocessable
from logserver.metrics import Metrics
from logserver.storage import (
    AuditRow,
    EntryRow,
    Storage,
    StorageError,
    StorageUnavailable,
    TreeConflict,
)
from logserver.tree import MerkleTree
from signer.keys import CheckpointSigner, SignerError, SignerUnavailable
from verifier.checkpoint import Checkpoint
from verifier.merkle import leaf_hash
from verifier.note import NoteSignature, ed25519_key_id, format_note

logger = logging.getLogger(__name__)

# Builds a leaf from a submission and the signature over its digest.
LeafBuilder = Callable[["Submission", bytes], bytes]


@dataclass(frozen=True, slots=True)
class PublishedCheckpoint:
    size: int
    root: bytes
    note: bytes
    # The note as text, decoded once for every answer that carries it.
    text: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "text", self.note.decode())


@dataclass(frozen=True, slots=True)
class Integrated:
    """Where a submission landed; `leaf` is None for an entry found in the log."""

    index: int
    leaf: bytes | None
    checkpoint: PublishedCheckpoint
    created: bool
    leaf_hash: bytes | None = None


class _Waiter:
    """Where the answers to one `submit` or `submit_many` call go.

    One future per call rather than one per entry: a batch request of a
    thousand entries is answered by one wake-up, not a thousand.
    """

    __slots__ = ("future", "missing", "results")

    def __init__(self, count: int) -> None:
        self.future: asyncio.Future[list[Integrated]] = (
            asyncio.get_running_loop().create_future()
        )
        self.results: list[Integrated | None] = [None] * count
        self.missing = count

    def settle(self, slot: int, result: Integrated) -> None:
        if self.future.done() or self.results[slot] is not None:
            return
        self.results[slot] = result
        self.missing -= 1
        if self.missing == 0:
            # Every slot is filled now.
            self.future.set_result(cast(list[Integrated], self.results))

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass(slots=True)
class Submission:
    """A request that passed validation, authentication and policy."""

    dedup_key: bytes
    digest: bytes
    sign: Callable[[Sequence[bytes]], Awaitable[list[bytes]]]
    signer_name: str
    build_leaf: LeafBuilder
    # The decision that allowed it, stored in the same transaction as the
    # entry, so the answer waits for one commit, not two.
    audit: AuditRow | None = None
    # Set when queued: who waits for the answer, and at which position.
    waiter: _Waiter = field(init=False)
    slot: int = field(init=False)
    # Identical submissions that arrived while this one was in flight.
    followers: list[Submission] | None = field(init=False, default=None)


@dataclass(slots=True)
class _Batch:
    new: list[tuple[Submission, EntryRow]]
    existing: list[tuple[Submission, int]]


class Sequencer:
    """Owns the tree: the only writer of entries, tiles and checkpoints."""

    def __init__(
        self,
        storage: Storage,
        checkpoint_signer: CheckpointSigner,
        *,
        metrics: Metrics,
        max_batch: int = 1000,
        linger: float = 0.002,
        max_pending: int = 20000,
    ) -> None:
        self.storage = storage
        self.checkpoint_signer = checkpoint_signer
        self.origin = checkpoint_signer.name
        self.metrics = metrics
        self.max_batch = max_batch
        self.linger = linger
        self.tree = MerkleTree()
        self.published: PublishedCheckpoint | None = None
        # Signed (and answered with) but not yet stored: it is stored with the
        # next batch's transaction, or on its own once nothing is waiting. A
        # restart before then signs the same checkpoint again.
        self._unstored: PublishedCheckpoint | None = None

        self._key_id = ed25519_key_id(self.origin, checkpoint_signer.public_key)
        self._queue: asyncio.Queue[Submission] = asyncio.Queue(max_pending)
        metrics.pending.set_function(self._queue.qsize)
        self._signed: asyncio.Queue[_Batch] = asyncio.Queue(2)
        self._inflight: dict[bytes, Submission] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._followers: set[asyncio.Task[None]] = set()
        self._accepting = False
        self._resync_needed = False

    async def start(self) -> None:
        """Load the tree from storage, publish a checkpoint for it, start work."""
        await self._load()
        self._accepting = True
        self._tasks = [
            asyncio.create_task(self._signing_loop(), name="sequencer-signing"),
            asyncio.create_task(self._integration_loop(), name="sequencer-integration"),
        ]

    async def stop(self, drain_timeout: float = 10.0) -> None:
        """Refuse new work, finish what was accepted, then stop."""
        self._accepting = False
        try:
            # Queue items are marked done only once their batch moved on, so
            # these two joins wait for the batch in flight to be answered.
            async with asyncio.timeout(drain_timeout):
                await self._queue.join()
                await self._signed.join()
        except TimeoutError:
            logger.warning("stopped before every submission was answered")
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        # Answers to identical requests still writing their audit rows.
        await asyncio.gather(*self._followers, return_exceptions=True)
        await self._store_unstored()
        while not self._queue.empty():
            self._fail([self._queue.get_nowait()], Unavailable("the log is stopping"))

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def submit(self, submission: Submission) -> Integrated:
        """Queue a submission and wait until it is covered by a checkpoint."""
        (result,) = await self.submit_many([submission])
        return result

    async def submit_many(self, submissions: Sequence[Submission]) -> list[Integrated]:
        """Queue all of a batch request, or none of it if the queue is too full."""
        self._check_room(len(submissions))
        waiter = _Waiter(len(submissions))
        for slot, submission in enumerate(submissions):
            self._enqueue(submission, waiter, slot)
        # Shielded: a client that goes away must not cancel the batch's work.
        return await asyncio.shield(waiter.future)

    def _check_room(self, count: int) -> None:
        if not self._accepting:
            raise Unavailable("the log is not accepting submissions", retry_after=5)
        if count > self._queue.maxsize:
            raise PayloadTooLarge(
                f"{count} entries can never fit the queue of {self._queue.maxsize} "
                "(sequencer.max_pending); send smaller batches"
            )
        if self._queue.maxsize - self._queue.qsize() < count:
            raise Unavailable(
                "too many submissions are waiting; retry shortly", retry_after=1
            )

    def _enqueue(self, submission: Submission, waiter: _Waiter, slot: int) -> None:
        submission.waiter = waiter
        submission.slot = slot
        original = self._inflight.get(submission.dedup_key)
        if original is not None:
            # The same request is already on its way: it gets the same entry.
            if original.followers is None:
                original.followers = []
            original.followers.append(submission)
            return
        self._inflight[submission.dedup_key] = submission
        self._queue.put_nowait(submission)

    def _settle(self, submission: Submission, result: Integrated) -> None:
        submission.waiter.settle(submission.slot, result)
        if self._inflight.get(submission.dedup_key) is submission:
            del self._inflight[submission.dedup_key]
        if submission.followers:
            task = asyncio.create_task(self._answer(submission.followers, result))
            self._followers.add(task)
            task.add_done_callback(self._followers.discard)

    def _reject(self, submission: Submission, error: BaseException) -> None:
        submission.waiter.fail(error)
        if self._inflight.get(submission.dedup_key) is submission:
            del self._inflight[submission.dedup_key]
        for follower in submission.followers or ():
            follower.waiter.fail(error)

    async def _answer(self, followers: list[Submission], first: Integrated) -> None:
        """Answer requests identical to one in flight: the same entry, not new."""
        audit = [f.audit for f in followers if f.audit is not None]
        if audit:
            try:
                await self.storage.append_audit(audit)
            except Exception as exc:
                error = _as_api_error(exc)
                for follower in followers:
                    follower.waiter.fail(error)
                return
        result = Integrated(
            first.index, first.leaf, first.checkpoint, False, first.leaf_hash
        )
        for follower in followers:
            follower.waiter.settle(follower.slot, result)

    # Loading and resynchronising with storage.

    async def _load(self) -> None:
        state = await self.storage.load_state()
        tree = MerkleTree.from_leaf_hashes(state.leaf_hashes)
        if tree.root() != state.root:
            raise StorageError(
                f"the stored tiles give root {tree.root().hex()} but the stored "
                f"tree state says {state.root.hex()}: the database is damaged"
            )
        self.tree = tree
        if state.checkpoint is not None:
            self.published = self._check_stored_checkpoint(state.checkpoint)
        if self.published is None or self.published.size != tree.size:
            # Entries made durable before a crash, never covered by a
            # checkpoint: publish them now.
            await self._publish()
        logger.info(
            "loaded tree",
            extra={"tree_size": tree.size, "root": tree.root().hex()},
        )

    def _check_stored_checkpoint(self, note: bytes) -> PublishedCheckpoint:
        # Imported here: only startup needs the parser.
        from verifier.checkpoint import parse_checkpoint_body
        from verifier.note import parse_note

        body = parse_checkpoint_body(parse_note(note).text)
        if body.origin != self.origin:
            raise StorageError(
                f"the stored checkpoint is for origin {body.origin!r} but the "
                f"checkpoint key is named {self.origin!r}: wrong key or database"
            )
        if body.size > self.tree.size or self.tree.root(body.size) != body.root_hash:
            raise StorageError(
                f"the stored checkpoint at size {body.size} does not match the "
                "stored tree: the database is damaged"
            )
        return PublishedCheckpoint(body.size, body.root_hash, note)

    async def _resync(self) -> None:
        """Reload the tree after a write whose outcome is unknown."""
        state = await self.storage.load_state()
        if state.size != self.tree.size or state.root != self.tree.root():
            logger.warning(
                "tree changed under the sequencer; reloading",
                extra={"memory_size": self.tree.size, "stored_size": state.size},
            )
            await self._load()
        elif self.published is None or self.published.size != self.tree.size:
            await self._publish()
        elif state.checkpoint != self.published.note:
            await self._store(self.published)
        self._resync_needed = False

    async def _publish(self) -> None:
        await self._store(await self._sign_checkpoint())

    async def _sign_checkpoint(self) -> PublishedCheckpoint:
        """Sign the committed tree and serve it from now on."""
        size, root = self.tree.size, self.tree.root()
        body = Checkpoint(self.origin, size, root).to_text()
        signature = await self.checkpoint_signer.sign(body.encode())
        note = format_note(body, [NoteSignature(self.origin, self._key_id, signature)])
        self.published = PublishedCheckpoint(size, root, note)
        self.metrics.tree_size.set(size)
        return self.published

    async def _store(self, checkpoint: PublishedCheckpoint) -> None:
        await self.storage.store_checkpoint(checkpoint.size, checkpoint.note)
        unstored = self._unstored
        if unstored is not None and unstored.size <= checkpoint.size:
            self._unstored = None

    # The two stages.

    async def _take(self) -> list[Submission]:
        batch = [await self._queue.get()]
        self._drain_into(batch)
        if len(batch) < self.max_batch and self.linger > 0:
            await asyncio.sleep(self.linger)
            self._drain_into(batch)
        return batch

    def _drain_into(self, batch: list[Submission]) -> None:
        while len(batch) < self.max_batch:
            try:
                batch.append(self._queue.get_nowait())
            except asyncio.QueueEmpty:
                return

    async def _signing_loop(self) -> None:
        while True:
            batch = await self._take()
            try:
                await self._signed.put(await self._sign(batch))
            except Exception as exc:
                self._fail(batch, exc)
            finally:
                for _ in batch:
                    self._queue.task_done()

    async def _sign(self, batch: list[Submission]) -> _Batch:
        found = await self.storage.find_dedup([(s.digest, s.dedup_key) for s in batch])
        existing = [(s, found[s.dedup_key]) for s in batch if s.dedup_key in found]
        fresh = [s for s in batch if s.dedup_key not in found]

        # One call per key, so a backend can spread a batch over its sessions.
        by_key: dict[str, list[Submission]] = {}
        for s in fresh:
            by_key.setdefault(s.signer_name, []).append(s)
        signatures: dict[int, bytes] = {}
        for group in by_key.values():
            signed = await group[0].sign([s.digest for s in group])
            signatures.update(zip(map(id, group), signed, strict=True))

        new = []
        for s in fresh:
            try:
                leaf = s.build_leaf(s, signatures[id(s)])
            except ValueError as exc:
                # This submission's own fault (a leaf too large to log): fail
                # it alone, not the batch it shares with other clients.
                self._reject(s, Unprocessable(f"cannot log this entry: {exc}"))
                continue
            new.append((s, EntryRow(leaf, leaf_hash(leaf), s.dedup_key, s.digest)))
        return _Batch(new, existing)

    async def _integration_loop(self) -> None:
        while True:
            batch = await self._signed.get()
            merged = 1
            # Merge whatever else is ready: one transaction, one checkpoint.
            while not self._signed.empty():
                more = self._signed.get_nowait()
                batch.new += more.new
                batch.existing += more.existing
                merged += 1
            try:
                await self._integrate(batch)
            except Exception as exc:
                self._fail([s for s, _ in batch.new + batch.existing], exc)
            finally:
                for _ in range(merged):
                    self._signed.task_done()

    async def _integrate(self, batch: _Batch) -> None:
        began = time.perf_counter()
        if self._resync_needed:
            await self._resync()
        start = self.tree.size
        audit = [s.audit for s, _ in batch.new + batch.existing if s.audit is not None]
        if batch.new or audit:
            self.tree.append(row.leaf_hash for _, row in batch.new)
            # The checkpoint of the batch before rides along: one commit.
            carried = self._unstored
            try:
                await self.storage.append(
                    start,
                    [row for _, row in batch.new],
                    list(self.tree.tiles_touched(start)),
                    self.tree.root(),
                    audit,
                    None if carried is None else (carried.size, carried.note),
                )
            except BaseException:
                self.tree.truncate(start)
                self._resync_needed = True
                raise
            if self._unstored is carried:
                self._unstored = None
        checkpoint = self.published
        if checkpoint is None or checkpoint.size != self.tree.size:
            checkpoint = self._unstored = await self._sign_checkpoint()

        elapsed = time.perf_counter() - began
        self.metrics.entries.inc(len(batch.new))
        self.metrics.duplicates.inc(len(batch.existing))
        self.metrics.batch_size.observe(len(batch.new))
        self.metrics.integration_seconds.observe(elapsed)
        if batch.new:
            logger.debug(
                "integrated batch",
                extra={
                    "first_index": start,
                    "entries": len(batch.new),
                    "tree_size": checkpoint.size,
                    "seconds": round(elapsed, 6),
                },
            )

        # The answer needs durable entries and a signed checkpoint, not a
        # stored one: a checkpoint is a deterministic function of the
        # committed tree and the key, and a restart signs the same one again.
        for offset, (s, row) in enumerate(batch.new):
            self._settle(
                s, Integrated(start + offset, row.leaf, checkpoint, True, row.leaf_hash)
            )
        for s, index in batch.existing:
            self._settle(s, Integrated(index, None, checkpoint, False))
        if self._signed.empty():
            # No batch is ready to carry the checkpoint: store it now.
            await self._store_unstored()

    async def _store_unstored(self) -> None:
        checkpoint = self._unstored
        if checkpoint is None:
            return
        try:
            await self._store(checkpoint)
        except Exception as exc:
            self._resync_needed = True
            logger.warning(
                "cannot store the checkpoint; will store it with the next batch",
                extra={"tree_size": checkpoint.size, "error": repr(exc)},
            )

    def _fail(self, batch: Sequence[Submission], exc: BaseException) -> None:
        error = _as_api_error(exc)
        self.metrics.sequencing_failures.labels(type(exc).__name__).inc()
        logger.warning(
            "batch failed", extra={"entries": len(batch), "error": repr(exc)}
        )
        for s in batch:
            self._reject(s, error)


def _as_api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, SignerUnavailable):
        return Unavailable(
            "the signing key is unavailable; retry shortly", retry_after=2
        )
    if isinstance(exc, StorageUnavailable | TreeConflict):
        return Unavailable("the database is unavailable; retry shortly", retry_after=2)
    if isinstance(exc, Unavailable):
        return exc
    if isinstance(exc, SignerError | StorageError):
        return Unavailable("the log cannot sign or store right now", retry_after=10)
    return exc
