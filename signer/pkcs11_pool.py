"""The pool of PKCS#11 worker processes behind one signing key.

The log server never loads the PKCS#11 module itself (see
`signer.pkcs11_worker` for why). A `WorkerPool` runs one worker process per
session and feeds it over a socket from the event loop:

- a call's items are split into jobs, one per live worker (at most
  `MAX_BATCH` items each), and queued;
- each worker takes whatever is queued, up to `MAX_BATCH` items, as one
  request, so many small concurrent calls share round trips;
- a worker that exits, hangs or reports a lost session or token fails the
  jobs it holds with `SignerUnavailable` and is replaced on a later call,
  after a back-off, by a new process that logs in again;
- a watchdog fails jobs past the call timeout and replaces a worker stuck on
  one request for that long (no PKCS#11 call can be cancelled).

Workers are started with the "spawn" method, which imports the parent's
main module in each worker: the program's entry point must be guarded by
`if __name__ == "__main__":`.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import multiprocessing
import random
import socket
from collections import deque
from collections.abc import Coroutine, Sequence
from multiprocessing.process import BaseProcess
from typing import Any

from signer import pkcs11_worker as wire
from signer.keys import SignerError, SignerUnavailable
from signer.pkcs11_config import Pkcs11Config
from signer.pkcs11_worker import WorkerSpec

logger = logging.getLogger(__name__)

# Large enough that a round trip costs little next to the signing, small
# enough that an RSA batch (about 3 ms a signature) stays well under a second.
MAX_BATCH = 256

_BACKOFF_FIRST = 0.25
_BACKOFF_MAX = 30.0
_JOIN_TIMEOUT = 5.0

# Fork would copy the parent's threads' locks and any PKCS#11 state; a spawned
# worker starts a fresh interpreter and loads the module itself.
_SPAWN = multiprocessing.get_context("spawn")


class _State(enum.Enum):
    DEAD = "dead"
    STARTING = "starting"
    READY = "ready"


class _Job:
    """A slice of one call's items and the future its signatures go to."""

    __slots__ = ("deadline", "future", "items")

    def __init__(
        self,
        items: Sequence[bytes],
        future: asyncio.Future[list[bytes]],
        deadline: float,
    ) -> None:
        self.items = items
        self.future = future
        self.deadline = deadline

    def settle(self, signatures: list[bytes]) -> None:
        if not self.future.done():
            self.future.set_result(signatures)

    def fail(self, exc: SignerError) -> None:
        if not self.future.done():
            # A fresh exception per job: one instance raised in several tasks
            # would collect their tracebacks.
            self.future.set_exception(type(exc)(*exc.args))


class _Worker:
    """One worker process and the two tasks that talk to it."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.state = _State.DEAD
        self.process: BaseProcess | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.reply: asyncio.Future[bytes] | None = None
        self.inflight: list[_Job] = []
        self.busy_since: float | None = None
        self.failures = 0
        self.retry_at = 0.0
        self.last_error = ""


def _backoff(failures: int) -> float:
    delay = min(_BACKOFF_MAX, _BACKOFF_FIRST * 2 ** max(0, failures - 1))
    return float(delay * random.uniform(0.8, 1.2))


async def _read_frame(reader: asyncio.StreamReader) -> bytes:
    length = wire.frame_length(await reader.readexactly(4))
    return await reader.readexactly(length)


class WorkerPool:
    """Worker processes signing with one key, and the queue that feeds them."""

    def __init__(self, spec: WorkerSpec, config: Pkcs11Config) -> None:
        self._spec = spec
        self._timeout = config.timeout
        self._start_timeout = config.start_timeout
        self._workers = [_Worker(i) for i in range(config.workers)]
        self._queue: deque[_Job] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()  # drivers waiting
        self._watchdog: asyncio.Task[None] | None = None
        self._spki: bytes | None = None
        self._closed = False
        self._restarts: set[asyncio.Task[None]] = set()
        self._reaps: set[asyncio.Task[None]] = set()
        self._log = {"token": spec.token_label, "key": spec.key_label}
        self.workers_lost = 0  # since the pool started; each is restarted

    @property
    def pids(self) -> list[int]:
        return [
            w.process.pid
            for w in self._workers
            if w.state is _State.READY and w.process and w.process.pid
        ]

    async def start(self) -> bytes:
        """Start every worker; the key's SubjectPublicKeyInfo DER."""
        starts = [self._start(worker) for worker in self._workers]
        results = await asyncio.gather(*starts, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                await self.aclose()
                raise result
        self._watchdog = asyncio.create_task(self._watch())
        assert self._spki is not None
        return self._spki

    async def run(self, items: Sequence[bytes]) -> list[bytes]:
        """Sign `items` across the workers; the signatures in the same order."""
        if self._closed:
            raise SignerError("the signer is closed")
        if not items:
            return []
        self._revive()
        ready = sum(w.state is _State.READY for w in self._workers)
        starting = sum(w.state is _State.STARTING for w in self._workers)
        if ready + starting == 0:
            raise SignerUnavailable(self._unavailable_reason())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout
        per_job = min(MAX_BATCH, -(-len(items) // max(ready, 1)))
        jobs = [
            _Job(items[i : i + per_job], loop.create_future(), deadline)
            for i in range(0, len(items), per_job)
        ]
        self._queue.extend(jobs)
        while self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():
                waiter.set_result(None)
        # The watchdog enforces the deadline: a timer per call would cost more
        # than the signing when calls carry one digest each.
        if len(jobs) == 1:
            return await jobs[0].future
        parts = await asyncio.gather(*(job.future for job in jobs))
        return [signature for part in parts for signature in part]

    async def aclose(self) -> None:
        """Stop the workers: each closes its session (logging out) and exits."""
        if self._closed:
            return
        self._closed = True
        self._fail_queue(SignerUnavailable("the signer is closing"))
        tasks = [*self._restarts]
        if self._watchdog is not None:
            tasks.append(self._watchdog)
        for worker in self._workers:
            for job in worker.inflight:
                job.fail(SignerUnavailable("the signer is closing"))
            tasks += worker.tasks
            worker.tasks = []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for worker in self._workers:
            worker.state = _State.DEAD
            if worker.writer is not None:
                # EOF tells the worker to close its session, which logs it out.
                worker.writer.close()
                worker.writer = None
            if worker.process is not None:
                self._spawn(self._reaps, self._reap(worker.process))
                worker.process = None
        await asyncio.gather(*self._reaps, return_exceptions=True)

    # Starting and losing workers.

    async def _start(self, worker: _Worker) -> None:
        """Spawn a worker and wait until it has logged in and found the key."""
        worker.state = _State.STARTING
        parent_sock, child_sock = socket.socketpair()
        process = _SPAWN.Process(
            target=wire.serve,
            args=(self._spec, child_sock),
            name=f"pkcs11-{self._spec.key_label}-{worker.index}",
            daemon=True,
        )
        writer: asyncio.StreamWriter | None = None
        try:
            with child_sock:  # the child has its own copy once started
                await asyncio.to_thread(process.start)
            reader, writer = await asyncio.open_unix_connection(sock=parent_sock)
            async with asyncio.timeout(self._start_timeout):
                body = await _read_frame(reader)
            if body[0] == wire.TAG_ERROR:
                raise wire.decode_error(body[1:])
            if body[0] != wire.TAG_READY:
                raise wire.ProtocolError(f"unexpected frame tag {body[0]}")
            self._check_key(body[1:])
        except BaseException as exc:
            if writer is not None:
                writer.close()
            else:
                parent_sock.close()
            worker.state = _State.DEAD
            worker.failures += 1
            loop = asyncio.get_running_loop()
            worker.retry_at = loop.time() + _backoff(worker.failures)
            error = await self._start_error(exc, process)
            worker.last_error = str(error)
            if process.pid is not None:
                self._spawn(self._reaps, self._reap(process, kill=True))
            if error is exc:
                raise
            raise error from exc
        worker.process = process
        worker.writer = writer
        worker.state = _State.READY
        worker.tasks = [
            asyncio.create_task(self._read(worker, reader)),
            asyncio.create_task(self._drive(worker)),
        ]
        logger.info(
            "HSM worker ready",
            extra={**self._log, "worker": worker.index, "pid": process.pid},
        )

    async def _start_error(
        self, exc: BaseException, process: BaseProcess
    ) -> BaseException:
        """The exception to raise for a failed start, with what we know."""
        if isinstance(exc, SignerError | asyncio.CancelledError):
            return exc
        if isinstance(exc, TimeoutError):
            return SignerUnavailable(
                f"the HSM worker did not log in within {self._start_timeout:g} s"
            )
        if isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
            # Most often the spawned interpreter failed to import the parent's
            # main module (see the worker's stderr).
            if process.pid is not None:
                await asyncio.to_thread(process.join, 1.0)
            return SignerUnavailable(
                f"the HSM worker exited while starting (exit code "
                f"{process.exitcode}; see its stderr)"
            )
        if isinstance(exc, wire.ProtocolError | OSError):
            return SignerUnavailable(f"cannot start an HSM worker: {exc}")
        return exc

    def _check_key(self, spki: bytes) -> None:
        if self._spki is None:
            self._spki = spki
        elif spki != self._spki:
            # The label now names another key: signing on would publish
            # signatures under a key nobody was told about.
            raise SignerError(
                f"key {self._spec.key_label!r} in token "
                f"{self._spec.token_label!r} is not the key this signer started with"
            )

    async def _restart(self, worker: _Worker) -> None:
        try:
            await self._start(worker)
        except SignerError as exc:
            delay = worker.retry_at - asyncio.get_running_loop().time()
            logger.warning(
                "HSM worker failed to start",
                extra={
                    **self._log,
                    "worker": worker.index,
                    "error": str(exc),
                    "retry_in": round(delay, 2),
                },
            )
            if not self._live():
                self._fail_queue(SignerUnavailable(str(exc)))

    def _revive(self) -> None:
        now = asyncio.get_running_loop().time()
        for worker in self._workers:
            if worker.state is _State.DEAD and worker.retry_at <= now:
                worker.state = _State.STARTING
                self._spawn(self._restarts, self._restart(worker))

    def _lost(self, worker: _Worker, reason: str) -> None:
        """Give up on a worker: fail its jobs, stop it, schedule a restart."""
        if worker.state is not _State.READY:
            return
        worker.state = _State.DEAD
        worker.failures += 1
        self.workers_lost += 1
        delay = _backoff(worker.failures)
        worker.retry_at = asyncio.get_running_loop().time() + delay
        worker.last_error = reason
        error = SignerUnavailable(f"HSM worker lost: {reason}")
        for job in worker.inflight:
            job.fail(error)
        worker.inflight = []
        worker.busy_since = None
        current = asyncio.current_task()
        for task in worker.tasks:
            if task is not current:
                task.cancel()
        worker.tasks = []
        if worker.writer is not None:
            worker.writer.close()
            worker.writer = None
        pid = None
        if worker.process is not None:
            pid = worker.process.pid
            self._spawn(self._reaps, self._reap(worker.process, kill=True))
            worker.process = None
        logger.warning(
            "HSM worker lost",
            extra={
                **self._log,
                "worker": worker.index,
                "pid": pid,
                "reason": reason,
                "retry_in": round(delay, 2),
            },
        )
        if not self._live():
            self._fail_queue(error)

    async def _watch(self) -> None:
        """Fail jobs past their deadline; stop workers stuck in the HSM."""
        tick = min(1.0, self._timeout / 4)
        while True:
            await asyncio.sleep(tick)
            self._expire(asyncio.get_running_loop().time())

    def _expire(self, now: float) -> None:
        late = f"the HSM did not answer within {self._timeout:g} s"
        for job in self._queue:
            if job.deadline <= now:
                job.fail(SignerUnavailable(late))
        for worker in self._workers:
            for job in worker.inflight:
                if job.deadline <= now:
                    job.fail(SignerUnavailable(late))
            # No PKCS#11 call can be cancelled: a worker that sat on one
            # request for a whole timeout is replaced.
            busy_since = worker.busy_since
            if busy_since is not None and now - busy_since >= self._timeout:
                self._lost(worker, f"no answer within {self._timeout:g} s")

    async def _reap(self, process: BaseProcess, *, kill: bool = False) -> None:
        if kill and process.is_alive():
            process.kill()
        await asyncio.to_thread(process.join, _JOIN_TIMEOUT)
        if process.is_alive():
            process.kill()
            await asyncio.to_thread(process.join, _JOIN_TIMEOUT)
        with contextlib.suppress(ValueError):
            process.close()

    @staticmethod
    def _spawn(
        tasks: set[asyncio.Task[None]], coroutine: Coroutine[Any, Any, None]
    ) -> None:
        task = asyncio.create_task(coroutine)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def _live(self) -> bool:
        return any(w.state is not _State.DEAD for w in self._workers)

    def _unavailable_reason(self) -> str:
        now = asyncio.get_running_loop().time()
        wait = min(w.retry_at for w in self._workers) - now
        last = next((w.last_error for w in self._workers if w.last_error), "")
        return f"no HSM session ({last}); next attempt in {max(wait, 0):.1f} s"

    def _fail_queue(self, exc: SignerError) -> None:
        while self._queue:
            self._queue.popleft().fail(exc)

    # Feeding a worker.

    def _has_work(self) -> bool:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()  # its call timed out or was cancelled
        return bool(self._queue)

    async def _take(self) -> list[_Job]:
        """Wait for queued jobs; take up to `MAX_BATCH` items' worth."""
        while not self._has_work():
            waiter = asyncio.get_running_loop().create_future()
            self._idle.append(waiter)
            await waiter
        jobs = [self._queue.popleft()]
        count = len(jobs[0].items)
        while self._has_work():
            if count + len(self._queue[0].items) > MAX_BATCH:
                break
            job = self._queue.popleft()
            jobs.append(job)
            count += len(job.items)
        return jobs

    async def _drive(self, worker: _Worker) -> None:
        """Send queued work to one worker, one request at a time."""
        loop = asyncio.get_running_loop()
        while worker.state is _State.READY and worker.writer is not None:
            jobs = await self._take()
            items = [item for job in jobs for item in job.items]
            worker.inflight = jobs
            worker.busy_since = loop.time()
            worker.reply = reply = loop.create_future()
            try:
                worker.writer.write(wire.frame(wire.TAG_SIGN, wire.encode_items(items)))
                await worker.writer.drain()
                body = await reply
                worker.inflight = []
                worker.busy_since = None
                self._settle(worker, jobs, len(items), body)
            except ConnectionError as exc:
                self._lost(worker, f"cannot send to it: {exc}")
            except wire.ProtocolError as exc:
                worker.inflight = jobs
                self._lost(worker, f"protocol error: {exc}")
            except Exception as exc:
                # A bug here must not leave a worker nobody feeds.
                logger.exception("HSM worker driver failed", extra=self._log)
                worker.inflight = jobs
                self._lost(worker, f"internal error: {exc!r}")

    async def _read(self, worker: _Worker, reader: asyncio.StreamReader) -> None:
        """Hand each answer to the waiting driver; notice when the worker dies."""
        try:
            while True:
                body = await _read_frame(reader)
                reply, worker.reply = worker.reply, None
                if reply is None:
                    raise wire.ProtocolError("an answer nobody asked for")
                reply.set_result(body)
        except (asyncio.IncompleteReadError, ConnectionError):
            self._lost(worker, self._exit_reason(worker))
        except wire.ProtocolError as exc:
            self._lost(worker, f"protocol error: {exc}")

    def _exit_reason(self, worker: _Worker) -> str:
        process = worker.process
        code = None if process is None else process.exitcode
        return "the process exited" + ("" if code is None else f" ({code})")

    def _settle(
        self, worker: _Worker, jobs: list[_Job], expected: int, body: bytes
    ) -> None:
        """Hand out a worker's answer; `ProtocolError` if it makes no sense."""
        if body[0] == wire.TAG_ERROR:
            error = wire.decode_error(body[1:])
            if isinstance(error, SignerUnavailable):
                worker.inflight = jobs
                self._lost(worker, str(error))
                return
            logger.error(
                "HSM signing failed",
                extra={**self._log, "worker": worker.index, "error": str(error)},
            )
            for job in jobs:
                job.fail(error)
            return
        if body[0] != wire.TAG_RESULT:
            raise wire.ProtocolError(f"unexpected frame tag {body[0]}")
        signatures = wire.decode_items(body[1:])
        if len(signatures) != expected:
            raise wire.ProtocolError(
                f"{len(signatures)} signatures for {expected} items"
            )
        worker.failures = 0
        start = 0
        for job in jobs:
            job.settle(signatures[start : start + len(job.items)])
            start += len(job.items)
