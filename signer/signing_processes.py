"""Signing large batches with a software key in worker processes.

cryptography gives the GIL up while it computes a signature, but each
signature has to take it back, and beside a busy event loop that wait costs
more than the signature itself: 800 ECDSA P-256 signatures took 31 ms of wall
time on a thread of the server for 17 ms of CPU. A few worker processes sign
large batches on the other cores instead, each with its own GIL, and the
server's process keeps its CPU for requests.

The workers get the private key once, when they start, through the pipe that
multiprocessing sets up to its own children. They exit with the server: when
it shuts them down, and by themselves if it dies without doing so.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

if TYPE_CHECKING:
    from signer.software import SoftwarePrivateKey

logger = logging.getLogger(__name__)

# A forked child would inherit the server's threads' locks in whatever state
# they were; a spawned one starts clean.
_SPAWN = multiprocessing.get_context("spawn")

# How often a worker checks that the server that started it is still there.
_PARENT_CHECK_SECONDS = 1.0


class ProcessesUnavailable(Exception):
    """The workers cannot sign now; sign in this process instead."""


class SigningProcesses:
    """Worker processes that sign digests with one software key.

    Started on the first call, so a server that only ever signs small
    batches never starts them. If a worker dies (killed, out of memory), the
    call that saw it raises ProcessesUnavailable, and so does every call for
    `retry_seconds`; the next call after that starts new workers.
    """

    def __init__(
        self,
        key_name: str,
        private_key_der: bytes,
        algorithm: str,
        workers: int,
        *,
        retry_seconds: float = 30.0,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self._key_name = key_name
        self._der = private_key_der
        self._algorithm = algorithm
        self.workers = workers
        self._retry_seconds = retry_seconds
        self._pool: ProcessPoolExecutor | None = None
        self._broken_until = 0.0
        self._closed = False
        self.workers_lost = 0  # times a worker died and the pool was replaced

    def pids(self) -> list[int]:
        """The workers' process IDs (for tests and diagnostics)."""
        # ProcessPoolExecutor keeps them in an attribute it does not document;
        # without it this reports no workers rather than failing.
        processes = getattr(self._pool, "_processes", None) or {}
        return sorted(processes)

    async def sign(self, digests: Sequence[bytes]) -> list[bytes]:
        """Sign each digest, in order, spread over the workers."""
        pool = self._ready_pool()
        loop = asyncio.get_running_loop()
        size = -(-len(digests) // self.workers)
        parts = [list(digests[at : at + size]) for at in range(0, len(digests), size)]
        try:
            signed = await asyncio.gather(
                *(loop.run_in_executor(pool, _sign_part, part) for part in parts)
            )
        except BrokenProcessPool as exc:
            self._broken(pool, exc)
            raise ProcessesUnavailable(str(exc)) from exc
        return [signature for part in signed for signature in part]

    async def aclose(self) -> None:
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            await asyncio.to_thread(pool.shutdown, True, cancel_futures=True)

    def _ready_pool(self) -> ProcessPoolExecutor:
        if self._closed:
            raise ProcessesUnavailable("the signing processes are shut down")
        if self._pool is not None:
            return self._pool
        if time.monotonic() < self._broken_until:
            raise ProcessesUnavailable("the signing processes are restarting")
        self._pool = ProcessPoolExecutor(
            self.workers,
            mp_context=_SPAWN,
            initializer=_start_worker,
            initargs=(self._der, self._algorithm, os.getpid()),
        )
        logger.info(
            "starting signing processes",
            extra={"key": self._key_name, "workers": self.workers},
        )
        return self._pool

    def _broken(self, pool: ProcessPoolExecutor, exc: BaseException) -> None:
        if self._pool is pool:
            self._pool = None
            self.workers_lost += 1
            self._broken_until = time.monotonic() + self._retry_seconds
            pool.shutdown(wait=False, cancel_futures=True)
            logger.warning(
                "a signing process died; signing in the server's process until "
                "new ones start",
                extra={
                    "key": self._key_name,
                    "retry_seconds": self._retry_seconds,
                    "error": repr(exc),
                },
            )


# --- In the worker processes -----------------------------------------------

_worker_key: tuple[SoftwarePrivateKey, str] | None = None


def _start_worker(der: bytes, algorithm: str, parent: int) -> None:
    global _worker_key
    # Ctrl-C reaches the whole process group; the server shuts us down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    key = serialization.load_der_private_key(der, None)
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise TypeError(f"cannot sign artifacts with a {type(key).__name__}")
    _worker_key = (key, algorithm)
    threading.Thread(
        target=_exit_with, args=(parent,), name="parent-watch", daemon=True
    ).start()


def _exit_with(parent: int) -> None:
    # A worker blocks on a queue the server feeds; if the server is killed
    # outright nothing tells it, so it looks for itself.
    while os.getppid() == parent:
        time.sleep(_PARENT_CHECK_SECONDS)
    os._exit(0)


def _sign_part(digests: list[bytes]) -> list[bytes]:
    from signer.software import sign_digest

    assert _worker_key is not None, "the worker was started without a key"
    key, algorithm = _worker_key
    return [sign_digest(key, algorithm, d) for d in digests]
