"""Watch a log: verify every checkpoint it publishes and every entry it adds.

The monitor keeps, in its state directory, the last checkpoint it verified
and the index of the next entry to check, so it resumes where it stopped.
Entries are read through entry bundles and tiles, and nothing read from the
log is used before it is authenticated against a verified checkpoint.

Alerts are JSON objects, one per line on stdout and optionally POSTed to a
webhook. Those about the log itself (a rollback, two inconsistent
checkpoints, tiles that do not match a checkpoint) carry the evidence a
third party needs to check them: both signed checkpoints and the proof.
"""

from __future__ import annotations

import base64
import fcntl
import fnmatch
import hashlib
import logging
import os
import re
import time
import tomllib
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from verifier.checkpoint import (
    SignedCheckpoint,
    open_checkpoint,
    verify_checkpoint_consistency,
)
from verifier.errors import ConsistencyError, FormatError, VerificationError
from verifier.leaf import Leaf, parse_leaf, verify_artifact_signature
from verifier.logsource import LogSource, NotFound
from verifier.note import NoteVerifier
from verifier.tiles import TILE_WIDTH, TileReader, entries_path, tile_width
from verifier.verify import ArtifactPublicKey, b64

logger = logging.getLogger(__name__)

STATE_FILE = "state.json"
LOCK_FILE = "lock"
STATE_VERSION = 1
# Save progress after this many entry bundles.
SAVE_EVERY_BUNDLES = 16

# Alert kinds about the log as a whole.
BAD_CHECKPOINT = "bad_checkpoint"
ROLLBACK = "rollback"
INCONSISTENT = "inconsistent_checkpoints"
TILES_MISMATCH = "tiles_mismatch"
MISSING_DATA = "missing_data"
# Alert kinds about one leaf.
MALFORMED_LEAF = "malformed_leaf"
BAD_SIGNATURE = "bad_signature"
WATCH_RULE = "watch_rule"
REBUILD_MISMATCH = "rebuild_mismatch"
NOT_REBUILT = "not_rebuilt"


@dataclass(frozen=True)
class Alert:
    """Something a person should look at, with the evidence for it."""

    kind: str
    message: str
    origin: str
    index: int | None = None
    evidence: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "alert": self.kind,
            "origin": self.origin,
            "message": self.message,
            "time": int(time.time()),
        }
        if self.index is not None:
            body["index"] = self.index
        body["evidence"] = dict(self.evidence)
        return body


def _checkpoint_text(signed: SignedCheckpoint) -> str:
    return signed.raw.decode("utf-8")


# --- State -------------------------------------------------------------------


@dataclass(frozen=True)
class MonitorState:
    """The last verified checkpoint (None before the first poll) and next index."""

    checkpoint: SignedCheckpoint | None = None
    next_index: int = 0


def load_state(directory: Path, log_key: NoteVerifier) -> MonitorState:
    """Read the state, re-checking the stored checkpoint with the log key."""
    path = directory / STATE_FILE
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return MonitorState()
    try:
        body = orjson.loads(data)
    except orjson.JSONDecodeError as e:
        raise FormatError(f"{path} is not JSON") from e
    if (
        not isinstance(body, dict)
        or set(body) != {"version", "checkpoint", "next_index"}
        or body["version"] != STATE_VERSION
        or not isinstance(body["checkpoint"], str)
        or type(body["next_index"]) is not int
    ):
        raise FormatError(f"{path} is not a monitor state file")
    try:
        checkpoint = open_checkpoint(body["checkpoint"].encode(), log_key)
    except (FormatError, VerificationError) as e:
        raise FormatError(
            f"the checkpoint in {path} does not verify with the log key "
            f"{log_key.name} (another log's state, or tampered with): {e}"
        ) from e
    if not 0 <= body["next_index"] <= checkpoint.checkpoint.size:
        raise FormatError(f"{path}: next_index is outside the stored checkpoint")
    return MonitorState(checkpoint, body["next_index"])


def save_state(directory: Path, state: MonitorState) -> None:
    """Write the state atomically: a temporary file, fsync, rename, fsync."""
    assert state.checkpoint is not None
    data = orjson.dumps(
        {
            "version": STATE_VERSION,
            "checkpoint": _checkpoint_text(state.checkpoint),
            "next_index": state.next_index,
        },
        option=orjson.OPT_INDENT_2,
    )
    path = directory / STATE_FILE
    temporary = directory / f".{STATE_FILE}.{os.getpid()}.tmp"
    try:
        with temporary.open("wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        # Gone after a successful rename; after a failure (disk full), the
        # old state stays and no half-written file is left beside it.
        temporary.unlink(missing_ok=True)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def lock_state(directory: Path) -> IO[bytes]:
    """Hold an exclusive lock on the state directory; keep the file open."""
    directory.mkdir(parents=True, exist_ok=True)
    lock = (directory / LOCK_FILE).open("ab")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as e:
        lock.close()
        raise OSError(f"another monitor is using {directory}") from e
    return lock


# --- Watch rules and rebuilds ------------------------------------------------


_RULE_KEYS = {
    "issuers": "identity issuers",
    "subjects": "identity subjects (fnmatch patterns)",
    "key_ids": "artifact key IDs",
    "artifact_names": "artifact names (fnmatch patterns)",
    "rules": "policy rules",
}


@dataclass(frozen=True)
class WatchRules:
    """What the log may contain; a rule left out allows anything.

    The TOML file has up to five lists of strings: `issuers`, `subjects`,
    `key_ids`, `artifact_names` and `rules`. Subjects and names are
    fnmatch patterns, matched case-sensitively.
    """

    issuers: tuple[str, ...] | None = None
    subjects: tuple[str, ...] | None = None
    key_ids: tuple[str, ...] | None = None
    artifact_names: tuple[str, ...] | None = None
    rules: tuple[str, ...] | None = None

    @classmethod
    def load(cls, path: Path) -> WatchRules:
        try:
            body = tomllib.loads(path.read_text("utf-8"))
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise FormatError(f"{path}: {e}") from e
        unknown = set(body) - set(_RULE_KEYS)
        if unknown:
            raise FormatError(
                f"{path}: unknown keys {sorted(unknown)}; known: {sorted(_RULE_KEYS)}"
            )
        values: dict[str, tuple[str, ...]] = {}
        for key, value in body.items():
            if not isinstance(value, list) or not all(
                isinstance(v, str) for v in value
            ):
                raise FormatError(f"{path}: {key} must be a list of strings")
            values[key] = tuple(value)
        return cls(**values)

    def violations(self, leaf: Leaf) -> list[str]:
        """One line per rule the leaf breaks."""
        found = []
        identity = leaf.identity
        if self.issuers is not None and identity.issuer not in self.issuers:
            found.append(f"issuer {identity.issuer!r} is not allowed")
        if self.subjects is not None and not _matches(identity.subject, self.subjects):
            found.append(f"subject {identity.subject!r} is not allowed")
        if self.key_ids is not None and leaf.signature.key_id not in self.key_ids:
            found.append(f"key {leaf.signature.key_id} is not allowed")
        name = leaf.artifact.name
        if self.artifact_names is not None and not _matches(name, self.artifact_names):
            found.append(f"artifact name {name!r} is not allowed")
        if self.rules is not None and leaf.policy.rule not in self.rules:
            found.append(f"policy rule {leaf.policy.rule!r} is not allowed")
        return found


def _matches(value: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


_MANIFEST_LINE = re.compile(r"(?P<digest>[0-9a-f]{64}) [ *](?P<name>.+)")


@dataclass(frozen=True)
class Rebuild:
    """The SHA-256 of each artifact an independent rebuild produced, by name."""

    digests: Mapping[str, str]

    @classmethod
    def from_directory(cls, root: Path) -> Rebuild:
        """Every regular file under root, named by its path relative to root."""
        if not root.is_dir():
            raise FormatError(f"{root} is not a directory")
        digests = {}
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                with path.open("rb") as f:
                    digest = hashlib.file_digest(f, "sha256").hexdigest()
                digests[path.relative_to(root).as_posix()] = digest
        return cls(digests)

    @classmethod
    def from_manifest(cls, path: Path) -> Rebuild:
        """`<sha256>  <name>` lines, as sha256sum writes them."""
        digests: dict[str, str] = {}
        for number, line in enumerate(path.read_text("utf-8").splitlines(), 1):
            if not line.strip():
                continue
            match = _MANIFEST_LINE.fullmatch(line)
            if match is None:
                raise FormatError(f"{path}:{number}: not '<sha256>  <name>'")
            name, digest = match["name"], match["digest"]
            if digests.get(name, digest) != digest:
                raise FormatError(f"{path}:{number}: {name!r} has two digests")
            digests[name] = digest
        return cls(digests)

    def check(self, leaf: Leaf) -> tuple[str, str] | None:
        """An alert kind and message if the leaf disagrees with the rebuild."""
        name, signed = leaf.artifact.name, leaf.artifact.sha256
        rebuilt = self.digests.get(name)
        if rebuilt is None:
            return NOT_REBUILT, f"{name!r} was signed but the rebuild never produced it"
        if rebuilt != signed:
            return (
                REBUILD_MISMATCH,
                f"{name!r} was signed with SHA-256 {signed}; the rebuild produced "
                f"{rebuilt}",
            )
        return None


# --- Alerts out --------------------------------------------------------------


class AlertSink:
    """Writes alerts as JSON lines and POSTs each to a webhook, if given."""

    def __init__(
        self, stream: IO[str], webhook: str | None = None, timeout: float = 10.0
    ) -> None:
        if webhook is not None and not webhook.startswith(("http://", "https://")):
            raise ValueError(f"the webhook must be an http(s) URL: {webhook!r}")
        self._stream = stream
        self._webhook = webhook
        self._timeout = timeout
        self.count = 0

    def __call__(self, alert: Alert) -> None:
        self.count += 1
        body = orjson.dumps(alert.to_json())
        self._stream.write(body.decode() + "\n")
        self._stream.flush()
        logger.warning("alert", extra={"alert": alert.kind, "index": alert.index})
        if self._webhook is not None:
            self._post(body)

    def _post(self, body: bytes) -> None:
        assert self._webhook is not None
        request = urllib.request.Request(  # noqa: S310 (http(s) only, see __init__)
            self._webhook,
            data=body,
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout):  # noqa: S310
                pass
        except OSError as e:
            logger.error(
                "webhook failed", extra={"webhook": self._webhook, "error": str(e)}
            )


# --- The monitor -------------------------------------------------------------


@dataclass
class PollResult:
    """What one poll saw."""

    tree_size: int | None = None
    checked: int = 0
    unparsed: int = 0
    alerts: int = 0


class Monitor:
    """Polls one log and checks what it publishes; see `poll`."""

    def __init__(
        self,
        log: LogSource,
        log_key: NoteVerifier,
        state_dir: Path,
        alert: Callable[[Alert], None],
        *,
        rules: WatchRules | None = None,
        rebuild: Rebuild | None = None,
        artifact_keys: Mapping[str, ArtifactPublicKey] | None = None,
        foreign: bool = False,
    ) -> None:
        self.log = log
        self.log_key = log_key
        self.state_dir = state_dir
        self.rules = rules
        self.rebuild = rebuild
        self.artifact_keys = artifact_keys
        self.foreign = foreign
        self._alert = alert
        self._sent: set[tuple[str, int | None, str]] = set()
        self.state = load_state(state_dir, log_key)

    def poll(self) -> PollResult:
        """One round; alerts go to the sink, FetchError means try again later.

        1. Fetch the latest checkpoint and check its signature.
        2. Compared with the last verified checkpoint, it must not be smaller
           (a rollback) and must be consistent with it (a proof read from
           tiles that are checked against the new root).
        3. Keep it as the last verified checkpoint.
        4. Read each new entry bundle, checked against the tiles and the new
           root, check each new leaf, and keep the next index as we go.
        On an alert of steps 1 and 2 the state is left unchanged.
        """
        result = PollResult()
        # 1.
        raw = self.log.read("checkpoint")
        try:
            latest = open_checkpoint(raw, self.log_key)
        except (FormatError, VerificationError) as e:
            self._raise(
                result,
                Alert(
                    BAD_CHECKPOINT,
                    f"the log's checkpoint does not verify: {e}",
                    self.log_key.name,
                    evidence={"checkpoint": raw.decode("utf-8", "replace")},
                ),
            )
            return result
        result.tree_size = latest.checkpoint.size
        # 2.
        reader = TileReader(
            self.log.read, latest.checkpoint.size, latest.checkpoint.root_hash
        )
        previous = self.state.checkpoint
        if previous is not None and not self._consistent(
            previous, latest, reader, result
        ):
            return result
        # 3.
        if previous is None or previous.raw != latest.raw:
            self.state = MonitorState(latest, self.state.next_index)
            save_state(self.state_dir, self.state)
            logger.info(
                "checkpoint verified",
                extra={
                    "tree_size": latest.checkpoint.size,
                    "root": b64(latest.checkpoint.root_hash),
                },
            )
        # 4.
        self._check_entries(latest, reader, result)
        return result

    def _raise(self, result: PollResult, alert: Alert) -> None:
        """Count the alert; send it unless this run sent the same one before.

        A log that stays forked, rolled back or broken would otherwise raise
        the same alert at every poll.
        """
        result.alerts += 1
        key = (alert.kind, alert.index, alert.message)
        if key not in self._sent:
            self._sent.add(key)
            self._alert(alert)

    def _consistent(
        self,
        old: SignedCheckpoint,
        new: SignedCheckpoint,
        reader: TileReader,
        result: PollResult,
    ) -> bool:
        origin = self.log_key.name
        evidence: dict[str, Any] = {
            "old_checkpoint": _checkpoint_text(old),
            "new_checkpoint": _checkpoint_text(new),
        }
        if new.checkpoint.size < old.checkpoint.size:
            message = (
                f"the log rolled back from size {old.checkpoint.size} "
                f"to {new.checkpoint.size}"
            )
            self._raise(result, Alert(ROLLBACK, message, origin, evidence=evidence))
            return False
        try:
            proof = reader.consistency_proof(old.checkpoint.size)
        except (FormatError, VerificationError) as e:
            message = f"the log's tiles do not match its checkpoint: {e}"
            self._raise(
                result, Alert(TILES_MISMATCH, message, origin, evidence=evidence)
            )
            return False
        except NotFound as e:
            message = f"the log does not serve a tile its checkpoint covers: {e}"
            self._raise(result, Alert(MISSING_DATA, message, origin, evidence=evidence))
            return False
        try:
            verify_checkpoint_consistency(old, new, proof)
        except ConsistencyError as e:
            evidence["consistency_proof"] = [b64(h) for h in e.proof]
            message = (
                f"checkpoints at sizes {old.checkpoint.size} and "
                f"{new.checkpoint.size} are inconsistent: the log forked"
            )
            self._raise(result, Alert(INCONSISTENT, message, origin, evidence=evidence))
            return False
        return True

    def _check_entries(
        self, latest: SignedCheckpoint, reader: TileReader, result: PollResult
    ) -> None:
        size = latest.checkpoint.size
        start = next_index = self.state.next_index
        first, end = start // TILE_WIDTH, -(-size // TILE_WIDTH)
        for done, bundle in enumerate(range(first, end), 1):
            try:
                leaves = reader.read_entry_bundle(bundle)
            except (FormatError, VerificationError, NotFound) as e:
                kind, message = (
                    (MISSING_DATA, f"the log does not serve entry bundle {bundle}: {e}")
                    if isinstance(e, NotFound)
                    else (
                        TILES_MISMATCH,
                        f"entry bundle {bundle} does not match the checkpoint: {e}",
                    )
                )
                evidence = {
                    "checkpoint": _checkpoint_text(latest),
                    "path": entries_path(bundle, tile_width(0, bundle, size)),
                }
                origin = latest.checkpoint.origin
                self._raise(result, Alert(kind, message, origin, evidence=evidence))
                break
            for offset, data in enumerate(leaves):
                index = bundle * TILE_WIDTH + offset
                if index >= start:
                    self._check_leaf(index, data, latest, reader, result)
                    result.checked += 1
            next_index = bundle * TILE_WIDTH + len(leaves)
            if done % SAVE_EVERY_BUNDLES == 0:
                self._advance(latest, next_index)
        self._advance(latest, next_index)
        logger.info(
            "entries checked",
            extra={"from": start, "to": next_index, "tree_size": size},
        )

    def _advance(self, latest: SignedCheckpoint, next_index: int) -> None:
        if next_index != self.state.next_index:
            self.state = MonitorState(latest, next_index)
            save_state(self.state_dir, self.state)

    def _check_leaf(
        self,
        index: int,
        data: bytes,
        latest: SignedCheckpoint,
        reader: TileReader,
        result: PollResult,
    ) -> None:
        problems: list[tuple[str, str]] = []
        try:
            leaf = parse_leaf(data)
        except FormatError as e:
            if self.foreign:
                result.unparsed += 1
                return
            problems.append((MALFORMED_LEAF, f"entry {index} is not a valid leaf: {e}"))
        else:
            problems += self._leaf_problems(leaf)
        if not problems:
            return
        evidence = {
            "leaf": b64(data),
            "checkpoint": _checkpoint_text(latest),
            "inclusion_proof": [b64(h) for h in reader.inclusion_proof(index)],
        }
        for kind, message in problems:
            alert = Alert(kind, message, latest.checkpoint.origin, index, evidence)
            self._raise(result, alert)

    def _leaf_problems(self, leaf: Leaf) -> list[tuple[str, str]]:
        problems = []
        if self.artifact_keys is not None:
            problem = _signature_problem(leaf, self.artifact_keys)
            if problem is not None:
                problems.append((BAD_SIGNATURE, problem))
        if self.rules is not None:
            problems += [(WATCH_RULE, v) for v in self.rules.violations(leaf)]
        if self.rebuild is not None:
            mismatch = self.rebuild.check(leaf)
            if mismatch is not None:
                problems.append(mismatch)
        return problems


def _signature_problem(leaf: Leaf, keys: Mapping[str, ArtifactPublicKey]) -> str | None:
    key = keys.get(leaf.signature.key_id)
    if key is None:
        return f"signed by key {leaf.signature.key_id}, which is not a known key"
    digest = bytes.fromhex(leaf.artifact.sha256)
    signature = base64.b64decode(leaf.signature.value)
    try:
        verify_artifact_signature(key, leaf.signature.algorithm, digest, signature)
    except VerificationError as e:
        return f"{e} with key {leaf.signature.key_id}"
    return None
