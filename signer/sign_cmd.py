"""`signer sign`: hash files, have the log sign them, check, write bundles.

    signer sign FILE... --log URL [--log-key VKEY] [--token TOKEN]
                [--output DIR] [--key NAME] [--source-repository R]
                [--source-commit C] [--source-ref R] [--builder B]
                [--invocation I] [--progress] [--json]

Only digests leave the machine. Every answer from the log is verified as a
consumer will verify it (`verifier.verify.verify_bundle`) before the bundle
is written as `<file>.sigbundle`, next to the file or in --output. Exit
status: 0 when every file was signed and checked, 1 when any was not, 2 for
a usage error.

`add_parser` and `run` are wired into `signer.cli` by its owner.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import hashlib
import json
import logging
import os
import random
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pydantic import BaseModel, ConfigDict, ValidationError

from signer.atomicfile import write_atomic
from verifier.bundle import make_bundle, parse_bundle
from verifier.errors import FormatError, VerificationError
from verifier.leaf import Leaf
from verifier.merkle import leaf_hash
from verifier.note import NoteVerifier
from verifier.verify import (
    ArtifactPublicKey,
    load_artifact_key,
    load_log_key,
    verify_bundle,
)

logger = logging.getLogger(__name__)

BATCH_SIZE = 1000
DEFAULT_WAIT = 300.0
POLL_INTERVAL = 2.0
CHUNK_SIZE = 1 << 20
MAX_RESPONSE_SIZE = 64 << 20
BUNDLE_SUFFIX = ".sigbundle"
MAX_ERRORS_SHOWN = 10
# Show progress for this many files, or this many bytes, and more.
PROGRESS_FILES = 20
PROGRESS_BYTES = 256 << 20
DEFAULT_AUDIENCE = "logsign"

TOKEN_ENV = "SIGNER_TOKEN"  # noqa: S105 (the variable's name, not a secret)
LOG_KEY_ENV = "SIGNER_LOG_KEY"
ID_TOKEN_ENVS = ("SIGNER_ID_TOKEN", "CI_JOB_JWT_V2")


class SignError(Exception):
    """Signing one or all files failed; the message says why, in one line."""


class UsageError(SignError):
    """The command line cannot be used; exit status 2."""


class RetryLater(SignError):
    """The log is overloaded or unreachable; `delay` is its Retry-After."""

    def __init__(self, message: str, delay: float | None = None) -> None:
        super().__init__(message)
        self.delay = delay


# --- Command line ------------------------------------------------------------


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add `sign` to the `signer` command's subparsers."""
    sign = subparsers.add_parser(
        "sign",
        help="sign files through the transparency log",
        description="Hash each FILE locally, send the digests to the log to "
        "be signed and logged, verify every answer (signature, inclusion "
        "proof, checkpoint) and write FILE.sigbundle. Only digests leave the "
        "machine.",
    )
    sign.add_argument("files", nargs="+", type=Path, metavar="FILE")
    sign.add_argument("--log", required=True, metavar="URL", help="the log's URL")
    sign.add_argument(
        "--log-key",
        metavar="VKEY",
        help=f"pin the log's verifier key (or a file holding it; default: "
        f"${LOG_KEY_ENV}, else the key the log publishes)",
    )
    sign.add_argument(
        "--token",
        metavar="TOKEN",
        help=f"bearer token (default: ${TOKEN_ENV}, else the CI's OIDC token)",
    )
    sign.add_argument(
        "--output",
        type=Path,
        metavar="DIR",
        help="write the bundles here (default: next to each file)",
    )
    sign.add_argument("--key", metavar="NAME", help="the log's artifact key to use")
    claims = sign.add_argument_group("provenance claims, recorded in the leaf")
    claims.add_argument("--source-repository", metavar="URL")
    claims.add_argument("--source-commit", metavar="SHA")
    claims.add_argument("--source-ref", metavar="REF")
    claims.add_argument("--builder", metavar="ID")
    claims.add_argument("--invocation", metavar="URL")
    sign.add_argument(
        "--audience",
        default=DEFAULT_AUDIENCE,
        help=f"audience of a CI OIDC token (default: {DEFAULT_AUDIENCE})",
    )
    sign.add_argument(
        "--wait",
        type=float,
        default=DEFAULT_WAIT,
        metavar="S",
        help="seconds to wait for a request the policy parks for a builder quorum "
        f"or approvals, polling the log (default: {DEFAULT_WAIT:.0f})",
    )
    sign.add_argument(
        "--retries",
        type=int,
        default=5,
        metavar="N",
        help="retries on 503 or a lost connection (default: 5)",
    )
    sign.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds to wait for each answer (default: 60)",
    )
    sign.add_argument(
        "--progress",
        action="store_true",
        help="show progress on stderr (the default on a terminal for many or "
        "large files)",
    )
    sign.add_argument("--json", action="store_true", help="print a JSON result")
    sign.set_defaults(run=run)


@dataclass
class Outcome:
    """What happened to one file."""

    file: Path
    sha256: str = ""
    size: int = 0
    bundle: Path | None = None
    index: int | None = None
    tree_size: int | None = None
    key_id: str | None = None
    error: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "file": str(self.file),
            "sha256": self.sha256,
            "size": self.size,
            "status": "failed" if self.error else "signed",
            "bundle": None if self.bundle is None else str(self.bundle),
            "index": self.index,
            "tree_size": self.tree_size,
            "key_id": self.key_id,
            "error": self.error,
        }


def run(args: argparse.Namespace) -> int:
    """Sign every file; 0 only when all were signed and checked."""
    try:
        outcomes = _sign(args)
    except UsageError as e:
        print(f"signer: error: {e}", file=sys.stderr)
        return 2
    except SignError as e:
        print(f"signer: error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps([o.to_json() for o in outcomes], indent=2))
    failed = [o for o in outcomes if o.error is not None]
    if not args.json:
        for o in outcomes:
            if o.error is None:
                print(
                    f"signed {o.file} -> {o.bundle} "
                    f"(entry {o.index}, tree size {o.tree_size})"
                )
    for o in failed[:MAX_ERRORS_SHOWN]:
        print(f"signer: {o.file}: {o.error}", file=sys.stderr)
    if failed:
        more = len(failed) - MAX_ERRORS_SHOWN
        also = f" ({more} more not shown)" if more > 0 else ""
        print(
            f"signer: {len(failed)} of {len(outcomes)} files were not signed{also}",
            file=sys.stderr,
        )
    return 1 if failed else 0


def _sign(args: argparse.Namespace) -> list[Outcome]:
    """Check the inputs, hash, submit in batches, verify, write."""
    files: list[Path] = args.files
    if args.retries < 0 or args.timeout <= 0:
        raise UsageError("--retries must be >= 0 and --timeout positive")
    bundles = _bundle_paths(files, args.output)
    claims = _claims(args)
    client = LogClient(
        args.log, retries=args.retries, timeout=args.timeout, wait=args.wait
    )
    token = _token(args, client)
    pinned = args.log_key or os.environ.get(LOG_KEY_ENV)
    log_key = _log_key(pinned) if pinned else None

    outcomes = [Outcome(path) for path in files]
    progress = _Progress.for_files(files, args.progress)
    for outcome in outcomes:
        outcome.sha256, outcome.size = _hash_file(outcome.file, progress)
    progress.done()

    published = client.keys()
    if log_key is None:
        log_key = _log_key(published.checkpoint_key)
        print(
            f"signer: warning: no --log-key; trusting the key the log publishes: "
            f"{published.checkpoint_key} (pin it with --log-key or ${LOG_KEY_ENV})",
            file=sys.stderr,
        )
    wanted_key = published.key_id_for(args.key) if args.key else None
    for start in range(0, len(outcomes), BATCH_SIZE):
        batch = outcomes[start : start + BATCH_SIZE]
        requests = [_request(o, claims, args.key) for o in batch]
        try:
            answers = client.submit(requests, token)
        except SignError as e:
            # The log refused or is gone: the files not yet signed all fail.
            for outcome in outcomes[start:]:
                outcome.error = str(e)
            break
        paths = bundles[start : start + BATCH_SIZE]
        for outcome, request, answer, path in zip(
            batch, requests, answers, paths, strict=True
        ):
            try:
                _check_and_write(
                    outcome, request, answer, path, log_key, published, wanted_key
                )
            except SignError as e:
                outcome.error = str(e)
        if progress.enabled and len(outcomes) > BATCH_SIZE:
            done = min(len(outcomes), start + BATCH_SIZE)
            print(f"signer: submitted {done}/{len(outcomes)} files", file=sys.stderr)
    return outcomes


def _bundle_paths(files: Sequence[Path], output: Path | None) -> list[Path]:
    if output is not None and not output.is_dir():
        raise UsageError(f"--output {output} is not a directory")
    paths = []
    for path in files:
        if not path.is_file():
            raise UsageError(f"{path} is not a file")
        directory = output if output is not None else path.parent
        paths.append(directory / (path.name + BUNDLE_SUFFIX))
    seen: dict[Path, Path] = {}
    for path, bundle in zip(files, paths, strict=True):
        other = seen.setdefault(bundle.resolve(), path)
        if other != path:
            raise UsageError(f"{other} and {path} would both write {bundle}")
    return paths


def _claims(args: argparse.Namespace) -> dict[str, dict[str, str]]:
    source = {
        "repository": args.source_repository,
        "commit": args.source_commit,
        "ref": args.source_ref,
    }
    build = {"builder": args.builder, "invocation": args.invocation}
    claims = {}
    for name, values in (("source", source), ("build", build)):
        given = {k: v for k, v in values.items() if v is not None}
        if given:
            claims[name] = given
    return claims


def _request(
    outcome: Outcome, claims: Mapping[str, Mapping[str, str]], key: str | None
) -> dict[str, Any]:
    request: dict[str, Any] = {
        "artifact": {
            "name": outcome.file.name,
            "sha256": outcome.sha256,
            "size": outcome.size,
        },
        **claims,
    }
    if key is not None:
        request["key"] = key
    return request


def _log_key(text: str) -> NoteVerifier:
    try:
        return load_log_key(text)
    except (FormatError, OSError) as e:
        raise UsageError(f"log key: {e}") from e


# --- Hashing -----------------------------------------------------------------


class _Progress:
    """A progress line on stderr, rewritten in place at most 10 times a second."""

    def __init__(self, total_bytes: int, files: int, enabled: bool) -> None:
        self.total_bytes, self.files, self.enabled = total_bytes, files, enabled
        self.bytes_done = self.files_done = 0
        self._last = 0.0
        self._stream: IO[str] = sys.stderr

    @classmethod
    def for_files(cls, files: Sequence[Path], forced: bool) -> _Progress:
        total = sum(path.stat().st_size for path in files)
        big = len(files) >= PROGRESS_FILES or total >= PROGRESS_BYTES
        return cls(total, len(files), forced or (big and sys.stderr.isatty()))

    def add(self, data_bytes: int, file_done: bool = False) -> None:
        self.bytes_done += data_bytes
        self.files_done += file_done
        now = time.monotonic()
        if self.enabled and (now - self._last >= 0.1 or file_done):
            self._last = now
            self._stream.write(
                f"\rsigner: hashing {self.files_done}/{self.files} files, "
                f"{self.bytes_done / 2**20:,.1f}/{self.total_bytes / 2**20:,.1f} MiB"
            )
            self._stream.flush()

    def done(self) -> None:
        if self.enabled:
            self._stream.write("\n")
            self._stream.flush()


def _hash_file(path: Path, progress: _Progress) -> tuple[str, int]:
    """SHA-256 and size of a file, streamed in 1 MiB chunks."""
    digest, size = hashlib.sha256(), 0
    try:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK_SIZE):
                digest.update(chunk)
                size += len(chunk)
                progress.add(len(chunk))
    except OSError as e:
        raise UsageError(f"cannot read {path}: {e.strerror}") from e
    progress.add(0, file_done=True)
    return digest.hexdigest(), size


# --- Checking an answer ------------------------------------------------------


class _Proof(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    index: int
    tree_size: int
    hashes: list[str]


class _Entry(BaseModel):
    """An Entry as SPEC.md section 4.5 defines it; extra members are ignored."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)
    index: int
    leaf: str
    leaf_hash: str
    inclusion_proof: _Proof
    checkpoint: str


def _b64(text: str, what: str) -> bytes:
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise SignError(f"the log sent a {what} that is not base64") from e
    return data


def _check_and_write(
    outcome: Outcome,
    request: Mapping[str, Any],
    answer: _Entry,
    path: Path,
    log_key: NoteVerifier,
    published: PublishedKeys,
    wanted_key: str | None,
) -> None:
    """Verify one answer completely, then write its bundle atomically.

    1. The answer is self-consistent: the proof is for the answer's index,
       the leaf hash is the hash of the leaf.
    2. The leaf records what was asked: name, digest, size and claims, and
       the key asked for.
    3. The bundle verifies as a consumer will check it: the digest, the
       signature with the published key of the leaf's key ID, the
       checkpoint with the log key, and the inclusion proof at the
       checkpoint's size, which must be the proof's tree size.
    """
    leaf = _b64(answer.leaf, "leaf")
    hashes = [_b64(h, "proof hash") for h in answer.inclusion_proof.hashes]
    # 1.
    if answer.inclusion_proof.index != answer.index:
        raise SignError("the log's inclusion proof is for another index")
    if _b64(answer.leaf_hash, "leaf hash") != leaf_hash(leaf):
        raise SignError("the log's leaf hash is not the hash of its leaf")
    # 3. (run first: it parses the leaf that 2 needs)
    bundle = make_bundle(leaf, answer.index, hashes, answer.checkpoint.encode())
    data = bundle.to_json()
    try:
        verified = verify_bundle(
            parse_bundle(data),
            bytes.fromhex(outcome.sha256),
            log_key,
            published.artifact_keys,
            size=outcome.size,
        )
    except (FormatError, VerificationError) as e:
        raise SignError(f"the log's answer does not verify: {e}") from e
    if verified.checkpoint.checkpoint.size != answer.inclusion_proof.tree_size:
        raise SignError("the log's checkpoint is not for the proof's tree size")
    # 2.
    _check_claims(verified.leaf, request, wanted_key)
    _write_atomic(path, data)
    outcome.bundle = path
    outcome.index = answer.index
    outcome.tree_size = verified.checkpoint.checkpoint.size
    outcome.key_id = verified.leaf.signature.key_id
    logger.info(
        "bundle written",
        extra={"file": str(outcome.file), "index": answer.index, "bundle": str(path)},
    )


def _check_claims(
    leaf: Leaf, request: Mapping[str, Any], wanted_key: str | None
) -> None:
    artifact = request["artifact"]
    recorded = leaf.model_dump(mode="json", exclude_none=True)
    if recorded["artifact"] != artifact:
        raise SignError(
            f"the leaf records artifact {recorded['artifact']}, not {artifact}"
        )
    for part in ("source", "build"):
        if recorded.get(part) != request.get(part):
            raise SignError(f"the leaf's {part} claims are not the ones sent")
    if wanted_key is not None and leaf.signature.key_id != wanted_key:
        raise SignError(f"the leaf is signed by key {leaf.signature.key_id}")


def _write_atomic(path: Path, data: bytes) -> None:
    try:
        write_atomic(path, data)
    except OSError as e:
        raise SignError(f"cannot write {path}: {e.strerror}") from e


# --- Talking to the log ------------------------------------------------------


@dataclass
class PublishedKeys:
    """`/api/v1/keys`: the checkpoint key and the artifact keys by key ID."""

    checkpoint_key: str
    artifact_keys: dict[str, ArtifactPublicKey] = field(default_factory=dict)
    names: dict[str, str] = field(default_factory=dict)

    def key_id_for(self, name: str) -> str:
        if name not in self.names:
            known = ", ".join(sorted(self.names)) or "none"
            raise UsageError(f"the log has no artifact key {name!r}; known: {known}")
        return self.names[name]


class LogClient:
    """The log's write API and key list, with bounded, jittered retries.

    Retrying a submission is safe: the log answers a repeated request with
    the entry it already holds (SPEC.md section 4.3).
    """

    def __init__(
        self,
        url: str,
        *,
        retries: int = 5,
        timeout: float = 60.0,
        wait: float = DEFAULT_WAIT,
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--log must be an http(s) URL, not {url!r}")
        self.url = url if url.endswith("/") else url + "/"
        self.retries = retries
        self.timeout = timeout
        self.wait = wait

    def keys(self) -> PublishedKeys:
        body = self._call("GET", "api/v1/keys", None, None)
        try:
            checkpoint_key = body["checkpoint_key"]
            entries = body["artifact_keys"]
            assert isinstance(checkpoint_key, str) and isinstance(entries, list)
            published = PublishedKeys(checkpoint_key)
            for entry in entries:
                key_id, key = load_artifact_key(entry["public_key_pem"].encode())
                # A key is used only under the ID it hashes to.
                if key_id != entry["key_id"]:
                    raise SignError(
                        f"the log publishes key {entry['key_id']} with a public "
                        f"key whose ID is {key_id}"
                    )
                published.artifact_keys[key_id] = key
                published.names[entry["name"]] = key_id
        except (KeyError, TypeError, AssertionError, AttributeError) as e:
            raise SignError("the log's key list is malformed") from e
        except FormatError as e:
            raise SignError(f"the log publishes a key that does not load: {e}") from e
        return published

    def submit(self, requests: Sequence[Mapping[str, Any]], token: str) -> list[_Entry]:
        """Submit one request, or a batch of up to 1,000."""
        answers: object
        if len(requests) == 1:
            answer = self._call("POST", "api/v1/entries", requests[0], token)
            if "request_id" in answer and "index" not in answer:
                answer = self._wait_for_entry(answer)
            answers = [answer]
        else:
            body = {"entries": list(requests)}
            answers = self._call("POST", "api/v1/entries/batch", body, token).get(
                "entries"
            )
        if not isinstance(answers, list) or len(answers) != len(requests):
            raise SignError("the log's batch answer does not have one entry each")
        try:
            return [_Entry.model_validate(answer) for answer in answers]
        except ValidationError as e:
            raise SignError("the log's answer is not an entry") from e

    def _wait_for_entry(self, parked: dict[str, Any]) -> dict[str, Any]:
        """Poll a parked request (202) until it is logged, refused or time is up."""
        request_id = str(parked.get("request_id"))
        if not re.fullmatch(r"[0-9a-f]{32}", request_id):
            raise SignError("the log parked the request under a malformed ID")
        deadline = time.monotonic() + self.wait
        logger.warning(
            "the policy parked the request; waiting",
            extra={"request_id": request_id, "state": parked.get("state")},
        )
        while True:
            entry = parked.get("entry")
            if isinstance(entry, dict):
                return entry
            state = parked.get("state")
            if state in ("denied", "rejected", "expired"):
                reasons = "; ".join(
                    str(r.get("message")) for r in parked.get("reasons", [])
                )
                raise SignError(f"request {request_id} was {state}: {reasons}")
            if time.monotonic() >= deadline:
                raise SignError(
                    f"request {request_id} is still {state} after {self.wait:.0f} s "
                    "(it needs more builders or approvals; `signer approve "
                    f"{request_id}` approves it); run signer sign again later: "
                    "the log answers with the entry once it exists"
                )
            time.sleep(POLL_INTERVAL)
            parked = self._call("GET", f"api/v1/requests/{request_id}", None, None)

    def _call(
        self, method: str, path: str, body: Any, token: str | None
    ) -> dict[str, Any]:
        for attempt, delay in enumerate(_backoff(self.retries + 1)):
            try:
                return self._once(method, path, body, token)
            except RetryLater as e:
                if attempt == self.retries:
                    raise SignError(f"{e}; gave up after {attempt + 1} attempts") from e
                wait = min(60.0, e.delay) if e.delay is not None else delay
                logger.warning(
                    "retrying", extra={"path": path, "error": str(e), "wait": wait}
                )
                time.sleep(wait)
        raise AssertionError("unreachable")

    def _once(
        self, method: str, path: str, body: Any, token: str | None
    ) -> dict[str, Any]:
        headers = {"Accept": "application/json", "User-Agent": "logsign-signer"}
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        url = self.url + path
        # The URL's scheme was checked to be http(s) in __init__.
        request = urllib.request.Request(  # noqa: S310
            url, data, headers, method=method
        )
        try:
            with urllib.request.urlopen(  # noqa: S310
                request, timeout=self.timeout
            ) as response:
                raw = _read_limited(response, MAX_RESPONSE_SIZE)
        except urllib.error.HTTPError as e:
            message = _error_message(e)
            if e.code in (429, 502, 503, 504):
                raise RetryLater(f"{url}: {e.code} {message}", _retry_after(e)) from e
            raise SignError(f"{url}: {e.code} {message}") from e
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise RetryLater(f"cannot reach {url}: {reason}") from e
        if len(raw) > MAX_RESPONSE_SIZE:
            raise SignError(f"{url}: the answer is too large")
        try:
            answer = json.loads(raw)
        except ValueError as e:
            raise SignError(f"{url}: the answer is not JSON") from e
        if not isinstance(answer, dict):
            raise SignError(f"{url}: the answer is not a JSON object")
        return answer


def _read_limited(response: IO[bytes], limit: int) -> bytes:
    """The body, or its first limit + 1 bytes; read(limit) would allocate it all."""
    pieces, size = [], 0
    while size <= limit and (piece := response.read(1 << 16)):
        pieces.append(piece)
        size += len(piece)
    return b"".join(pieces)


def _backoff(attempts: int) -> Iterator[float]:
    """Exponential backoff with full jitter: up to 0.5 s, 1 s, 2 s, ... 30 s."""
    for attempt in range(attempts):
        yield random.uniform(0, min(30.0, 0.5 * 2**attempt))


def _retry_after(error: urllib.error.HTTPError) -> float | None:
    value = (error.headers.get("Retry-After") or "").strip()
    return float(value) if value.isdigit() else None


def _error_message(error: urllib.error.HTTPError) -> str:
    """The message of the log's JSON error body (SPEC.md 4.2), if it has one."""
    try:
        body = json.loads(error.read(1 << 16))
        message = body["error"]["message"]
    except (ValueError, KeyError, TypeError, OSError):
        return str(error.reason)
    return str(message)


# --- Tokens ------------------------------------------------------------------


def _token(args: argparse.Namespace, client: LogClient) -> str:
    """--token, $SIGNER_TOKEN, or the CI's OIDC identity token."""
    token = args.token or os.environ.get(TOKEN_ENV)
    if token:
        return str(token)
    found = ci_identity_token(args.audience, os.environ, timeout=client.timeout)
    if found is None:
        raise UsageError(
            f"no token: give --token, set ${TOKEN_ENV}, or run in GitHub Actions "
            f"(with id-token: write) or GitLab CI (an id_tokens entry as "
            f"${ID_TOKEN_ENVS[0]})"
        )
    source, token = found
    print(f"signer: using the OIDC identity token from {source}", file=sys.stderr)
    return token


def ci_identity_token(
    audience: str, env: Mapping[str, str], *, timeout: float = 30.0
) -> tuple[str, str] | None:
    """The CI job's OIDC identity token and where it came from, if any.

    GitLab CI (and anything else) can hand one over in SIGNER_ID_TOKEN (an
    `id_tokens:` entry) or the older CI_JOB_JWT_V2; GitHub Actions issues
    one on request to ACTIONS_ID_TOKEN_REQUEST_URL for the job's request
    token, when the workflow has `permissions: id-token: write`.
    """
    for name in ID_TOKEN_ENVS:
        if env.get(name):
            return name, env[name]
    url, bearer = (
        env.get("ACTIONS_ID_TOKEN_REQUEST_URL"),
        env.get("ACTIONS_ID_TOKEN_REQUEST_TOKEN"),
    )
    if not url or not bearer:
        return None
    if not url.startswith(("https://", "http://")):
        raise SignError("ACTIONS_ID_TOKEN_REQUEST_URL is not an http(s) URL")
    separator = "&" if "?" in url else "?"
    full = f"{url}{separator}audience={urllib.parse.quote(audience)}"
    request = urllib.request.Request(  # noqa: S310 (http(s) only, checked above)
        full, headers={"Authorization": f"Bearer {bearer}"}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body = json.loads(response.read(1 << 16))
        token = body["value"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SignError(f"cannot get the GitHub Actions OIDC token: {e}") from e
    if not isinstance(token, str) or not token:
        raise SignError("the GitHub Actions OIDC token is empty")
    return "GitHub Actions", token
