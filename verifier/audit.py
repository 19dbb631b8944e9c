"""Audit a whole log: recompute every tile and the root from the entries.

The audit trusts nothing but the log key. It hashes every entry of every
entry bundle, compares the leaf hashes with the level 0 tiles, builds each
level above from the one below and compares it with the served tiles, and
finally compares the recomputed root with the signed checkpoint. Unless the
log is foreign, every entry must also parse as one of our leaves.

Level 0 is nearly all the work, so it runs in worker processes over chunks
of entry bundles; the levels above, a 256th of the data each, run in the
main process. Each hash starts from a copied SHA-256 context, and the leaf
check is one regular expression per leaf, with parse_leaf only as the
fallback (`is_canonical_leaf`).
"""

from __future__ import annotations

import base64
import hashlib
import logging
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from verifier.checkpoint import open_checkpoint
from verifier.errors import FormatError
from verifier.leaf import parse_leaf
from verifier.logsource import FetchError, HttpLog, LogSource, open_log
from verifier.merkle import EMPTY_ROOT, HASH_SIZE, fold_nodes, range_nodes
from verifier.note import NoteVerifier
from verifier.tiles import TILE_HEIGHT, TILE_WIDTH, entries_path, tile_path, tile_width

logger = logging.getLogger(__name__)

# Entry bundles per task: big enough to amortise a task, small enough that
# two workers stay busy to the end and progress moves.
CHUNK_BUNDLES = 32
# Below this many bundles, worker processes cost more than they save.
MIN_BUNDLES_FOR_WORKERS = 64
MAX_PROBLEMS = 50

_LEAF = hashlib.sha256(b"\x00")
_NODE = hashlib.sha256(b"\x01")

Progress = Callable[[int, int], None]


@dataclass
class AuditReport:
    """What the audit found; `ok` only if every check passed."""

    origin: str
    tree_size: int
    root_hash: bytes
    entries: int = 0
    tiles: dict[int, int] = field(default_factory=dict)
    parsed: int = 0
    unparsed: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.problem_count == 0

    def problem(self, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "origin": self.origin,
            "tree_size": self.tree_size,
            "root_hash": base64.b64encode(self.root_hash).decode(),
            "entries": self.entries,
            "tiles": {str(level): n for level, n in sorted(self.tiles.items())},
            "leaves": {"parsed": self.parsed, "unparsed": self.unparsed},
            "problem_count": self.problem_count,
            "problems": self.problems,
            "seconds": round(self.seconds, 3),
        }


# --- Level 0, in worker processes --------------------------------------------


@dataclass
class _Chunk:
    """The outcome of auditing entry bundles [first, first + len(roots))."""

    first: int
    # The root of each full bundle's leaf hashes; None if it was unreadable.
    roots: list[bytes | None] = field(default_factory=list)
    # The leaf hashes of the partial bundle at the right edge, if in the chunk.
    edge: bytes | None = None
    entries: int = 0
    parsed: int = 0
    unparsed: int = 0
    problems: list[str] = field(default_factory=list)
    problem_count: int = 0

    def problem(self, message: str) -> None:
        self.problem_count += 1
        if len(self.problems) < MAX_PROBLEMS:
            self.problems.append(message)


# A worker process opens the log once and keeps it for all its tasks.
_worker_log: tuple[str, LogSource] | None = None

_Task = tuple[str, int, int, int, bool]


def _run_task(task: _Task) -> _Chunk:
    global _worker_log
    location, tree_size, first, end, check_leaves = task
    if _worker_log is None or _worker_log[0] != location:
        _worker_log = (location, open_log(location))
    return _audit_chunk(_worker_log[1], tree_size, first, end, check_leaves)


def _audit_chunk(
    log: LogSource, tree_size: int, first: int, end: int, check_leaves: bool
) -> _Chunk:
    """Hash entry bundles [first, end) and compare them with the level 0 tiles."""
    chunk = _Chunk(first)
    for index, bundle, tile in _read_pairs(log, tree_size, first, end, chunk):
        width = tile_width(0, index, tree_size)
        hashes = _bundle_hashes(chunk, index, width, bundle, check_leaves)
        if hashes is not None and tile is not None and tile != hashes:
            chunk.problem(
                f"{tile_path(0, index, width)} does not match the leaf hashes "
                f"of {entries_path(index, width)}"
            )
        if width == TILE_WIDTH:
            chunk.roots.append(None if hashes is None else subtree_root(hashes))
        else:
            chunk.edge = hashes
    return chunk


def _read_pairs(
    log: LogSource, tree_size: int, first: int, end: int, chunk: _Chunk
) -> Iterator[tuple[int, bytes | None, bytes | None]]:
    """Each entry bundle with its level 0 tile; None for an unreadable file.

    Over HTTP the chunk's files are fetched together, concurrently; from a
    directory they are read one pair at a time, as they are needed.
    """
    pairs = []
    for index in range(first, end):
        width = tile_width(0, index, tree_size)
        pairs.append((index, entries_path(index, width), tile_path(0, index, width)))
    if isinstance(log, HttpLog):
        try:
            files = log.read_many([path for _, *paths in pairs for path in paths])
        except FetchError:
            pass  # read them one by one below, to tell which are missing
        else:
            for n, (index, _, _) in enumerate(pairs):
                yield index, files[2 * n], files[2 * n + 1]
            return
    for index, bundle, tile in pairs:
        yield index, _read_or_none(log, bundle, chunk), _read_or_none(log, tile, chunk)


def _bundle_hashes(
    chunk: _Chunk, index: int, width: int, data: bytes | None, check_leaves: bool
) -> bytes | None:
    """The leaf hashes of one entry bundle, concatenated; None if unusable.

    The hot loop of the audit: one copied SHA-256 context per leaf, bytes
    slices (cheaper than memoryviews at this size) and one join at the end.
    """
    if data is None:
        return None
    path = entries_path(index, width)
    copy = _LEAF.copy
    digests: list[bytes] = []
    pos, size = 0, len(data)
    for i in range(width):
        if pos + 2 > size:
            chunk.problem(f"{path} is truncated: {i} of {width} entries")
            return None
        start = pos + 2
        pos = start + (data[pos] << 8 | data[pos + 1])
        if pos > size:
            chunk.problem(f"{path} is truncated: {i} of {width} entries")
            return None
        leaf = data[start:pos]
        h = copy()
        h.update(leaf)
        digests.append(h.digest())
        if check_leaves:
            if is_canonical_leaf(leaf):
                chunk.parsed += 1
            else:
                _parse_leaf(chunk, index * TILE_WIDTH + i, leaf)
    if pos != size:
        chunk.problem(f"{path} holds more than {width} entries")
        return None
    chunk.entries += width
    return b"".join(digests)


def _parse_leaf(chunk: _Chunk, index: int, leaf: bytes) -> None:
    """Off the fast path, parse_leaf decides, and explains a refusal."""
    try:
        parse_leaf(leaf)
    except FormatError as e:
        chunk.unparsed += 1
        chunk.problem(f"entry {index} is not a valid leaf: {leaf_error(e)}")
    else:
        chunk.parsed += 1


def leaf_error(error: FormatError) -> str:
    """A one-line reason why parse_leaf refused a leaf."""
    cause = error.__cause__
    if isinstance(cause, ValidationError) and cause.errors():
        first = cause.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return (
            f"{error}: {where}: {first['msg']}" if where else f"{error}: {first['msg']}"
        )
    return str(error)


def subtree_root(hashes: bytes) -> bytes:
    """MTH over concatenated 32-byte hashes, RFC 9162 section 2.1.1.

    The same level-by-level pairing as `merkle.root_from_leaf_hashes`: a
    node without a sibling moves up unchanged.
    """
    if not hashes:
        return EMPTY_ROOT
    copy, pair = _NODE.copy, 2 * HASH_SIZE
    level = hashes
    while len(level) > HASH_SIZE:
        paired = len(level) // pair * pair
        digests = []
        for at in range(0, paired, pair):
            h = copy()
            h.update(level[at : at + pair])
            digests.append(h.digest())
        level = b"".join(digests) + level[paired:]
    return level


# --- A fast leaf check -------------------------------------------------------
#
# One regular expression over the raw bytes, for leaves as this version of
# the server writes them: no approvals, no claims, and no string that needs
# an escape. Such a leaf is canonical exactly when the expression matches
# and the bytes are UTF-8: every key is a literal in sorted order, every
# number is a canonical decimal, and a string with nothing to escape is
# written as itself. What the expression cannot say (name length and control
# characters, integer range, canonical base64) is checked on its groups.

_TEXT = rb'"[^"\\\x00-\x1f]*"'
_HEX = rb'"[0-9a-f]{64}"'
_NUMBER = rb"(?:0|[1-9][0-9]{0,18})"
_FAST_LEAF = re.compile(
    rb"""
    \{"artifact":\{"name":"(?P<name>[^"\\\x00-\x1f]+)","sha256":HEX
        (?:,"size":(?P<size>NUMBER))?\}
    (?:,"build":\{(?:"builder":TEXT(?:,"invocation":TEXT)?|"invocation":TEXT)?\})?
    ,"identity":\{"claims":\{\},"issuer":TEXT,"subject":TEXT\}
    ,"policy":\{"approvals":\[\],"mode":"(?:automated|ceremonial)"
        ,"policy_sha256":HEX,"rule":TEXT\}
    ,"signature":\{"algorithm":"(?:ecdsa-p256-sha256|ecdsa-p384-sha256
        |rsa-pkcs1v15-sha256|rsa-pss-sha256)","key_id":HEX
        ,"value":"(?P<value>[A-Za-z0-9+/]+={0,2})"\}
    (?:,"source":\{(?:"commit":TEXT(?:,"ref":TEXT)?(?:,"repository":TEXT)?
        |"ref":TEXT(?:,"repository":TEXT)?|"repository":TEXT)?\})?
    ,"timestamp":(?P<timestamp>NUMBER),"version":1\}
    """.replace(b"TEXT", _TEXT)
    .replace(b"HEX", _HEX)
    .replace(b"NUMBER", _NUMBER),
    re.VERBOSE,
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]").search
_MAX_COUNT = b"9223372036854775807"  # 2**63 - 1
_MAX_NAME = 1024
# The last character before one or two "=" must leave no stray bits.
_BEFORE_PAD1 = b"AEIMQUYcgkosw048"
_BEFORE_PAD2 = b"AQgw"


def is_canonical_leaf(data: bytes) -> bool:
    """True only for bytes `verifier.leaf.parse_leaf` accepts, in a few µs.

    It says False for valid leaves outside the fast path (approvals, claims,
    strings with escapes); the caller then asks parse_leaf. It never says
    True for bytes parse_leaf refuses.
    """
    if len(data) > 0xFFFF:
        return False
    match = _FAST_LEAF.fullmatch(data)
    if match is None:
        return False
    name, size, timestamp, value = match.group("name", "size", "timestamp", "value")
    if data.isascii():
        # Only DEL can be a control character here: the rest are excluded.
        if len(name) > _MAX_NAME or b"\x7f" in name:
            return False
    else:
        try:
            data.decode("utf-8")
        except UnicodeDecodeError:
            return False
        text = name.decode("utf-8")
        if len(text) > _MAX_NAME or _CONTROL(text):
            return False
    # Canonical decimals of up to 19 digits: only 19 digits can overflow.
    for number in (size, timestamp):
        if number is not None and len(number) == 19 and number > _MAX_COUNT:
            return False
    # Canonical base64: whole quanta, and no bits set in the padding.
    if len(value) % 4:
        return False
    if value.endswith(b"=="):
        return value[-3] in _BEFORE_PAD2
    if value.endswith(b"="):
        return value[-2] in _BEFORE_PAD1
    return True


# --- The whole log -----------------------------------------------------------


def audit_log(
    location: str,
    log_key: NoteVerifier,
    *,
    foreign: bool = False,
    jobs: int | None = None,
    progress: Progress | None = None,
) -> AuditReport:
    """Audit the log at an http(s) URL or in a directory.

    1. The checkpoint is signed by the log key (else VerificationError).
    2. Every entry bundle's leaf hashes equal its level 0 tile, and (unless
       foreign) every entry parses as a leaf.
    3. Every tile above level 0 equals the hashes recomputed from below.
    4. The root recomputed from the entries equals the checkpoint's.
    Problems are collected in the report rather than raised.
    """
    began = time.monotonic()
    log = open_log(location)
    try:
        # 1.
        signed = open_checkpoint(log.read("checkpoint"), log_key)
        size = signed.checkpoint.size
        report = AuditReport(
            signed.checkpoint.origin, size, signed.checkpoint.root_hash
        )
        # 2.
        roots, edge, complete = _audit_level_zero(
            log, location, size, not foreign, jobs, report, progress
        )
        # 3. and 4.
        if complete:
            _audit_upper_levels(log, size, roots, edge, report)
        else:
            report.problem("the root cannot be recomputed: entries are missing")
    finally:
        log.close()
    report.seconds = time.monotonic() - began
    logger.info(
        "audit finished",
        extra={
            "tree_size": size,
            "problems": report.problem_count,
            "seconds": round(report.seconds, 3),
        },
    )
    return report


def _chunks(size: int) -> Iterator[tuple[int, int]]:
    bundles = -(-size // TILE_WIDTH)
    for first in range(0, bundles, CHUNK_BUNDLES):
        yield first, min(bundles, first + CHUNK_BUNDLES)


def _audit_level_zero(
    log: LogSource,
    location: str,
    size: int,
    check_leaves: bool,
    jobs: int | None,
    report: AuditReport,
    progress: Progress | None,
) -> tuple[bytearray, bytes, bool]:
    """Run the chunks, in workers for big logs; gather full-bundle roots in order."""
    tasks: list[_Task] = [
        (location, size, a, b, check_leaves) for a, b in _chunks(size)
    ]
    bundles = -(-size // TILE_WIDTH)
    jobs = jobs or os.cpu_count() or 1
    roots = bytearray()
    edge = b""
    complete = True

    def gather(chunk: _Chunk) -> None:
        nonlocal edge, complete
        for root in chunk.roots:
            if root is None:
                complete = False
            else:
                roots.extend(root)
        if chunk.edge is not None:
            edge = chunk.edge
        report.entries += chunk.entries
        report.parsed += chunk.parsed
        report.unparsed += chunk.unparsed
        report.problem_count += chunk.problem_count - len(chunk.problems)
        for message in chunk.problems:
            report.problem(message)
        if progress is not None:
            progress(report.entries, size)

    if jobs == 1 or bundles < MIN_BUNDLES_FOR_WORKERS:
        for _, _, first, end, _ in tasks:
            gather(_audit_chunk(log, size, first, end, check_leaves))
    else:
        context = multiprocessing.get_context(_start_method())
        with context.Pool(jobs) as pool:
            for chunk in pool.imap(_run_task, tasks):
                gather(chunk)
    report.tiles[0] = bundles
    if size % TILE_WIDTH and len(edge) != (size % TILE_WIDTH) * HASH_SIZE:
        complete = False
    return roots, edge, complete


def _start_method() -> str:
    """fork when it is safe (no other thread could hold a lock), else not.

    fork starts workers in milliseconds; the others import this module
    again in each worker, a few hundred milliseconds.
    """
    methods = multiprocessing.get_all_start_methods()
    if "fork" in methods and threading.active_count() == 1:
        return "fork"
    return "forkserver" if "forkserver" in methods else "spawn"


def _audit_upper_levels(
    log: LogSource, size: int, roots: bytearray, edge: bytes, report: AuditReport
) -> None:
    """Compare tiles of level 1 and up, then the root, with recomputed hashes.

    `roots` holds the roots of the full level 0 tiles, which are the hashes
    a level 1 tile holds; `edge` the hashes of the partial level 0 tile.
    """
    edges = {0: edge}
    level, hashes = 1, bytes(roots)
    while size >> (TILE_HEIGHT * level):
        count = size >> (TILE_HEIGHT * level)
        assert len(hashes) == count * HASH_SIZE
        tiles = -(-count // TILE_WIDTH)
        paths = [tile_path(level, n, tile_width(level, n, size)) for n in range(tiles)]
        try:
            served: list[bytes | None] = list(log.read_many(paths))
        except FetchError:
            served = [_read_or_none(log, path, report) for path in paths]
        step = TILE_WIDTH * HASH_SIZE
        for n, (path, data) in enumerate(zip(paths, served, strict=True)):
            if data is not None and data != hashes[n * step : (n + 1) * step]:
                report.problem(f"{path} does not match the hashes recomputed below it")
        report.tiles[level] = tiles
        full = count // TILE_WIDTH * step
        edges[level] = hashes[full:]
        hashes = b"".join(
            subtree_root(hashes[at : at + step]) for at in range(0, full, step)
        )
        level += 1
    # The root from the edge of each level, as the tree's perfect subtrees.
    nodes = []
    for height, index in range_nodes(0, size) if size else []:
        level, rest = divmod(height, TILE_HEIGHT)
        start = (index << rest) % TILE_WIDTH * HASH_SIZE
        nodes.append(subtree_root(edges[level][start : start + (HASH_SIZE << rest)]))
    root = fold_nodes(nodes) if nodes else EMPTY_ROOT
    if root != report.root_hash:
        report.problem(
            "the root recomputed from the entries is "
            f"{base64.b64encode(root).decode()}, the checkpoint says "
            f"{base64.b64encode(report.root_hash).decode()}"
        )


def _read_or_none(
    log: LogSource, path: str, report: AuditReport | _Chunk
) -> bytes | None:
    try:
        return log.read(path)
    except FetchError as e:
        report.problem(f"cannot read {path}: {e}")
    return None
