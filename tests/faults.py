"""Fault injection helpers: load that remembers every answer, and the checks
a log must pass after a fault.

`Load` runs client threads against a server; every acknowledged entry
(index, leaf, inclusion proof, checkpoint) goes into a `Ledger`, and so does
every request whose outcome is unknown (a 503 or a lost connection: SPEC
4.2 says such a request may or may not have been logged). After the fault,
`Ledger.retry_in_doubt` sends those again and `check_log` proves that:

1. every acknowledged entry is at its index with the same leaf bytes, and
   its inclusion proof leads to the checkpoint it came with;
2. every checkpoint handed out is consistent with the log's current one;
3. no request was logged twice (every request has its own digest);
4. a full audit (`verifier.audit.audit_log`, as `verifier audit` runs it)
   recomputes every tile and the root from the entries.

`TcpProxy` stands between the log server and PostgreSQL and can cut every
connection and refuse new ones, the way asyncpg's own tests model a server
restart, without touching the shared PostgreSQL server.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from verifier.audit import audit_log
from verifier.checkpoint import (
    SignedCheckpoint,
    open_checkpoint,
    verify_checkpoint_consistency,
)
from verifier.logsource import HttpLog
from verifier.merkle import leaf_hash, root_from_leaf_hashes, verify_inclusion
from verifier.note import NoteVerifier
from verifier.tiles import TILE_WIDTH, entries_path, parse_entry_bundle

# Statuses a write may get under faults: anything else is a failure.
ACKNOWLEDGED = (200, 201)
RETRY_LATER = 503


def figures_line(text: str) -> None:
    """Print a line of figures, and append it to $LOGSIGN_FIGURES if set."""
    print(text)
    path = os.environ.get("LOGSIGN_FIGURES")
    if path:
        with Path(path).open("a", encoding="utf-8") as out:
            out.write(text + "\n")


def env_int(name: str, default: int) -> int:
    """A positive integer from the environment, for longer manual runs."""
    raw = os.environ.get(name)
    return default if raw is None else max(1, int(raw))


def request_body(tag: str, n: int) -> dict[str, Any]:
    """A submission with a digest of its own, so a duplicate is visible."""
    digest = hashlib.sha256(f"{tag}/{n}".encode()).hexdigest()
    return {"artifact": {"name": f"{tag}-{n}.bin", "sha256": digest}}


@dataclass(frozen=True, slots=True)
class Ack:
    """What the log promised for one request: its entry and a checkpoint."""

    index: int
    leaf: bytes
    proof: tuple[bytes, ...]
    tree_size: int
    checkpoint: bytes


@dataclass
class Ledger:
    """Every answer the clients got, keyed by the request's digest."""

    acks: dict[str, Ack] = field(default_factory=dict)
    in_doubt: dict[str, dict[str, Any]] = field(default_factory=dict)
    checkpoints: dict[int, bytes] = field(default_factory=dict)
    statuses: Counter[str] = field(default_factory=Counter)
    unexpected: list[str] = field(default_factory=list)
    sent: int = 0
    retried: int = 0
    # Retried requests that were in the log already (answered 200): their
    # first answer was lost after the commit.
    found: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    # Checkpoint sizes already shown consistent with a later checkpoint.
    _checked: set[int] = field(default_factory=set)
    # Acknowledged requests whose inclusion proof has been verified.
    _proven: set[str] = field(default_factory=set)

    def acknowledge(self, body: dict[str, Any], entry: dict[str, Any]) -> None:
        digest = body["artifact"]["sha256"]
        proof = entry["inclusion_proof"]
        ack = Ack(
            entry["index"],
            base64.b64decode(entry["leaf"]),
            tuple(base64.b64decode(h) for h in proof["hashes"]),
            proof["tree_size"],
            entry["checkpoint"].encode(),
        )
        with self.lock:
            earlier = self.acks.get(digest)
            if earlier is not None and earlier.index != ack.index:
                self.unexpected.append(
                    f"{digest} acknowledged at {earlier.index} and at {ack.index}"
                )
            self.acks.setdefault(digest, ack)
            self.in_doubt.pop(digest, None)
            self.checkpoints.setdefault(ack.tree_size, ack.checkpoint)

    def doubt(self, bodies: list[dict[str, Any]]) -> None:
        with self.lock:
            for body in bodies:
                digest = body["artifact"]["sha256"]
                if digest not in self.acks:
                    self.in_doubt[digest] = body

    def count(self, what: str) -> None:
        with self.lock:
            self.statuses[what] += 1

    def retry_in_doubt(self, url: str, token: str, threads: int = 8) -> int:
        """Send every request of unknown outcome again; each must now land."""
        pending = list(self.in_doubt.values())

        def retry(bodies: list[dict[str, Any]]) -> None:
            client = Client(url, token)
            try:
                for body in bodies:
                    self._retry(client, body)
            finally:
                client.close()

        workers = [
            threading.Thread(target=retry, args=(pending[i::threads],))
            for i in range(threads)
        ]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        assert not self.in_doubt, f"{len(self.in_doubt)} retries failed"
        return len(pending)

    def _retry(self, client: Client, body: dict[str, Any]) -> None:
        for attempt in range(50):
            try:
                status, answer, _ = client.post("api/v1/entries", body)
            except OSError:
                status, answer = RETRY_LATER, None
            if status in ACKNOWLEDGED:
                self.acknowledge(body, answer)
                with self.lock:
                    self.retried += 1
                    self.found += status == 200
                return
            assert status == RETRY_LATER, (status, answer)
            time.sleep(0.1 * (attempt + 1))
        raise AssertionError(f"retry of {body} never succeeded")

    def submit(self, client: Client, body: dict[str, Any]) -> int | None:
        """One single submission, recorded; its status, None if cut off."""
        with self.lock:
            self.sent += 1
        try:
            status, answer, _ = client.post("api/v1/entries", body)
        except OSError:
            self.doubt([body])
            return None
        if status in ACKNOWLEDGED:
            self.acknowledge(body, answer)
        elif status == RETRY_LATER:
            self.doubt([body])
        else:
            with self.lock:
                self.unexpected.append(f"{status} {answer}")
        return status


class Client:
    """A keep-alive HTTP client for one thread; raises OSError when cut off."""

    def __init__(self, url: str, token: str, timeout: float = 30.0) -> None:
        parts = urllib.parse.urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.token = token
        self.timeout = timeout
        self._conn: http.client.HTTPConnection | None = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection(
                self.host, self.port, timeout=self.timeout
            )
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def post(self, path: str, body: Any) -> tuple[int, Any, dict[str, str]]:
        """POST JSON; (status, parsed body, headers). Raises on a lost connection."""
        conn = self._connection()
        try:
            conn.request(
                "POST",
                "/" + path,
                body=json.dumps(body).encode(),
                headers={
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {self.token}",
                },
            )
            response = conn.getresponse()
            data = response.read()
        except (OSError, http.client.HTTPException):
            self.close()
            raise
        headers = {k.lower(): v for k, v in response.getheaders()}
        if response.will_close:
            self.close()
        return response.status, json.loads(data) if data else None, headers


class Load:
    """Client threads submitting unique digests until stopped.

    One request in `batch_every` is a batch of 2 to `batch_size` entries; the
    rest are single. Every answer is recorded in the ledger.
    """

    def __init__(
        self,
        url: str,
        token: str,
        ledger: Ledger,
        tag: str,
        *,
        threads: int = 6,
        batch_every: int = 5,
        batch_size: int = 20,
        seed: int = 0,
    ) -> None:
        self.url = url
        self.token = token
        self.ledger = ledger
        self.tag = tag
        self.batch_every = batch_every
        self.batch_size = batch_size
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(
                target=self._run,
                args=(f"{tag}.{i}", random.Random(seed * 1000 + i)),
                name=f"load-{tag}-{i}",
                daemon=True,
            )
            for i in range(threads)
        ]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), f"{thread.name} is stuck"

    def _run(self, tag: str, rng: random.Random) -> None:
        client = Client(self.url, self.token, timeout=20)
        ledger = self.ledger
        n = 0
        while not self._stop.is_set():
            count = 1
            if rng.randrange(self.batch_every) == 0:
                count = rng.randint(2, self.batch_size)
            bodies = [request_body(tag, n + i) for i in range(count)]
            n += count
            path, payload = "api/v1/entries", bodies[0]
            if count > 1:
                path, payload = "api/v1/entries/batch", {"entries": bodies}
            with ledger.lock:
                ledger.sent += count
            try:
                status, answer, headers = client.post(path, payload)
            except (OSError, http.client.HTTPException):
                ledger.doubt(bodies)
                ledger.count("connection lost")
                time.sleep(0.02)
                continue
            ledger.count(str(status))
            if status in ACKNOWLEDGED:
                entries = answer["entries"] if count > 1 else [answer]
                for body, entry in zip(bodies, entries, strict=True):
                    ledger.acknowledge(body, entry)
            elif status == RETRY_LATER:
                ledger.doubt(bodies)
                if not headers.get("retry-after", "").isdigit():
                    with ledger.lock:
                        ledger.unexpected.append(f"503 without Retry-After: {answer}")
                time.sleep(0.05)
            else:
                ledger.doubt(bodies)
                with ledger.lock:
                    ledger.unexpected.append(f"{status} {answer}")
        client.close()


@dataclass(frozen=True)
class LogView:
    """What `check_log` saw: the current checkpoint and the number of leaves."""

    checkpoint: SignedCheckpoint
    leaves: int
    audit_seconds: float
    digests: frozenset[str]


def read_leaves(log: HttpLog, size: int) -> list[bytes]:
    """Every leaf of the tree of `size`, from the entry bundles."""
    paths, widths = [], []
    for index in range(-(-size // TILE_WIDTH)):
        width = min(TILE_WIDTH, size - index * TILE_WIDTH)
        paths.append(entries_path(index, width))
        widths.append(width)
    leaves: list[bytes] = []
    for data, width in zip(log.read_many(paths), widths, strict=True):
        leaves += parse_entry_bundle(data, width)
    return leaves


def check_log(url: str, vkey: str, ledger: Ledger) -> LogView:
    """Steps 1 to 4 of the module docstring; raises AssertionError on a problem."""
    assert not ledger.unexpected, ledger.unexpected[:5]
    verifier = NoteVerifier.from_key(vkey)
    log = HttpLog(url)
    try:
        latest = open_checkpoint(log.read("checkpoint"), verifier)
        size, root = latest.checkpoint.size, latest.checkpoint.root_hash
        leaves = read_leaves(log, size)
        assert root_from_leaf_hashes([leaf_hash(x) for x in leaves]) == root

        # 1. Every acknowledged entry, where it was promised; the proof that
        # came with it (checked once, it does not change) leads to the
        # checkpoint that came with it.
        opened: dict[bytes, SignedCheckpoint] = {}
        for digest, ack in list(ledger.acks.items()):
            assert ack.index < size, f"{digest}: index {ack.index} beyond {size}"
            assert leaves[ack.index] == ack.leaf, f"{digest}: leaf {ack.index} differs"
            if digest in ledger._proven:
                continue
            if ack.checkpoint not in opened:
                opened[ack.checkpoint] = open_checkpoint(ack.checkpoint, verifier)
            given = opened[ack.checkpoint].checkpoint
            assert given.size == ack.tree_size > ack.index
            verify_inclusion(
                leaf_hash(ack.leaf), ack.index, given.size, ack.proof, given.root_hash
            )
            ledger._proven.add(digest)

        # 2. Every checkpoint handed out is a prefix of the current tree. Sizes
        # shown consistent with an earlier "current" checkpoint, which is
        # itself checked here, need no second proof.
        with ledger.lock:
            unchecked = {
                s: n for s, n in ledger.checkpoints.items() if s not in ledger._checked
            }
        for old_size, note in sorted(unchecked.items()):
            old = open_checkpoint(note, verifier)
            assert old_size <= size, f"checkpoint {old_size} is ahead of {size}"
            answer = json.loads(
                log.read(
                    f"api/v1/proof/consistency?old_size={old_size}&new_size={size}"
                )
            )
            proof = [base64.b64decode(h) for h in answer["hashes"]]
            verify_checkpoint_consistency(old, latest, proof)
            ledger._checked.add(old_size)
        with ledger.lock:
            ledger.checkpoints[size] = latest.raw
            ledger._checked.add(size)

        # 3. No request logged twice.
        digests = [json.loads(leaf)["artifact"]["sha256"] for leaf in leaves]
        twice = [d for d, n in Counter(digests).items() if n > 1]
        assert not twice, f"logged twice: {twice[:5]}"
    finally:
        log.close()

    # 4. The full audit.
    report = audit_log(url, verifier, jobs=1)
    assert report.ok, report.problems
    assert report.entries == size
    return LogView(latest, size, report.seconds, frozenset(digests))


class TcpProxy:
    """A TCP proxy on 127.0.0.1 that can go down and come back on one port.

    It runs an event loop in a thread of its own. `cut` aborts every proxied
    connection and stops listening (new connections are refused); `restore`
    listens on the same port again.
    """

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tcp-proxy", daemon=True
        )
        self._server: asyncio.Server | None = None
        self._transports: set[asyncio.WriteTransport] = set()

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        self._call(self._listen())
        return self

    def __exit__(self, *exc_info: object) -> None:
        with contextlib.suppress(Exception):
            self._call(self._cut())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def cut(self) -> None:
        self._call(self._cut())

    def restore(self) -> None:
        self._call(self._listen())

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(
            self._proxy, "127.0.0.1", self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def _cut(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        for transport in list(self._transports):
            transport.abort()
        self._transports.clear()

    async def _proxy(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.connections += 1
        pair = (writer.transport, up_writer.transport)
        self._transports.update(pair)
        try:
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        finally:
            for transport in pair:
                self._transports.discard(transport)
                transport.abort()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, asyncio.IncompleteReadError):
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.transport.abort()


def pg_dsn_via(dsn: str, port: int) -> str:
    """`dsn` with its host and port replaced by 127.0.0.1:`port`."""
    parts = urllib.parse.urlsplit(dsn)
    user = f"{parts.username}@" if parts.username else ""
    if parts.password:
        user = f"{parts.username}:{parts.password}@"
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{port}"))


@contextlib.contextmanager
def timed() -> Iterator[list[float]]:
    """Yields a one-element list that holds the elapsed seconds afterwards."""
    began = time.monotonic()
    elapsed = [0.0]
    try:
        yield elapsed
    finally:
        elapsed[0] = time.monotonic() - began
