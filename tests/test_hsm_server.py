"""The log server with both of its keys in a SoftHSM2 token, end to end.

Each test makes a token in a temporary directory (`tests/softhsm.py`),
generates the checkpoint key (Ed25519) and an artifact key (ECDSA P-256) in
it with the `signer key` command, as a user would, writes a configuration
file naming both keys, and runs a real `logserver serve` subprocess that gets
the PIN from an environment variable and nowhere else. Then:

- end to end: signatures over real files verify with the openssl command
  line, the checkpoint with the exported verifier key, and the PIN shows up
  in no output;
- under concurrent single and batch submissions every signature and every
  inclusion proof verifies;
- with the HSM broken mid-load (worker processes killed or hung, the token
  taken away and brought back), submissions get 503 with Retry-After and
  never anything else, no entry is half-written, and the log recovers by
  itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from signer import cli as signer_cli
from tests.serverproc import ServerProcess, spawned_children
from tests.softhsm import SoftHsmStore, SoftHsmToken
from verifier import cli as verifier_cli
from verifier.checkpoint import SignedCheckpoint, open_checkpoint
from verifier.leaf import parse_leaf, public_key_id, verify_artifact_signature
from verifier.merkle import leaf_hash, verify_inclusion
from verifier.note import NoteVerifier
from verifier.tiles import TILE_WIDTH, entries_path, parse_entry_bundle

pytestmark = pytest.mark.hsm

ORIGIN = "hsm.example/log"
TOKEN_LABEL = "logsign-hsm"
ARTIFACT_LABEL = "release-2026-p256"
CHECKPOINT_LABEL = "checkpoint-ed25519"
KEY_NAME = "release-2026"  # the artifact key's name in the configuration
PIN_ENV = "LOGSIGN_TEST_HSM_PIN"
# Distinctive, so that finding it anywhere in the output cannot be chance.
PIN = "pin-5081-qzv-hsm"

REQUEST_TIMEOUT = 20.0  # seconds; a request taking longer counts as a hang
CHECKPOINT_TIMEOUT = 2  # the checkpoint key's `timeout`: a hung worker's limit

CONFIG = """\
origin = "{origin}"
log_format = "json"  # the tests read the workers' pids from the log
default_artifact_key = "{key_name}"

[checkpoint_key]
backend = "pkcs11"
algorithm = "ed25519"
[checkpoint_key.pkcs11]
module = "{module}"
token_label = "{token}"
key_label = "{checkpoint_label}"
pin_env = "{pin_env}"
workers = 1
timeout = {checkpoint_timeout}

[artifact_keys.{key_name}]
backend = "pkcs11"
algorithm = "ecdsa-p256-sha256"
[artifact_keys.{key_name}.pkcs11]
module = "{module}"
token_label = "{token}"
key_label = "{artifact_label}"
pin_env = "{pin_env}"
workers = 2
timeout = 5
"""


# Commands, as a user runs them.


def run_signer(*args: str) -> str:
    """`signer ARGS...` in this process; its stdout."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = signer_cli.main(list(args))
    assert code == 0, f"signer {' '.join(args)}: exit {code}\n{err.getvalue()}"
    assert PIN not in out.getvalue() + err.getvalue()
    return out.getvalue()


def audit(server: ServerProcess, vkey: str) -> None:
    """`verifier audit`: every tile and the root recomputed from the entries."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = verifier_cli.main(["audit", "--log", server.url, "--log-key", vkey])
    assert code == 0, out.getvalue() + err.getvalue()


def require_openssl() -> None:
    if shutil.which("openssl") is not None:
        return
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail("the openssl command is missing; CI must install it")
    pytest.skip("needs the openssl command")


def openssl_verify(
    pem: Path, signature: Path, artifact: Path, *, ok: bool = True
) -> None:
    """`openssl dgst -sha256 -verify` over the file itself, as consumers run it."""
    command = ["openssl", "dgst", "-sha256", "-verify", str(pem)]
    command += ["-signature", str(signature), str(artifact)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    if ok:
        assert result.returncode == 0, result.stdout + result.stderr
        assert result.stdout.strip() == "Verified OK"
    else:
        assert result.returncode != 0, result.stdout


async def wait_until(what: str, condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting until {what}"
        await asyncio.sleep(0.05)


# The token, its keys and the server.


@dataclass(frozen=True)
class HsmSetup:
    store: SoftHsmStore
    token: SoftHsmToken
    config: Path
    artifact_key_id: str  # as `signer key generate` reported it

    def token_args(self) -> list[str]:
        return ["--module", self.token.module, "--token", self.token.label]

    def module_file(self) -> str:
        """The PKCS#11 module's file name, as /proc/PID/maps shows it."""
        return Path(self.token.module).resolve().name


@pytest.fixture
def hsm(tmp_path: Path) -> Iterator[HsmSetup]:
    """A fresh token holding both keys, made with `signer key generate`."""
    with SoftHsmStore(tmp_path / "softhsm") as store:
        token = store.create_token(TOKEN_LABEL, pin=PIN)
        token_args = ["--module", token.module, "--token", token.label]
        with pytest.MonkeyPatch.context() as env:
            env.setenv(PIN_ENV, PIN)
            generated = json.loads(
                run_signer(
                    "key", "generate", *token_args, "--label", ARTIFACT_LABEL,
                    "--algorithm", "ecdsa-p256", "--pin-env", PIN_ENV, "--json",
                )
            )  # fmt: skip
            run_signer(
                "key", "generate", *token_args, "--label", CHECKPOINT_LABEL,
                "--algorithm", "ed25519", "--pin-env", PIN_ENV,
            )  # fmt: skip
        assert generated["sensitive"] is True and generated["extractable"] is False
        config = tmp_path / "logserver.toml"
        config.write_text(
            CONFIG.format(
                origin=ORIGIN,
                key_name=KEY_NAME,
                module=token.module,
                token=token.label,
                checkpoint_label=CHECKPOINT_LABEL,
                artifact_label=ARTIFACT_LABEL,
                pin_env=PIN_ENV,
                checkpoint_timeout=CHECKPOINT_TIMEOUT,
            ),
            encoding="utf-8",
        )
        yield HsmSetup(store, token, config, generated["key_id"])


@pytest.fixture
def server(hsm: HsmSetup, tmp_path: Path) -> Iterator[ServerProcess]:
    """`logserver serve --config FILE`; the PIN is in its environment only."""
    proc = ServerProcess(
        tmp_path / "data", "--config", str(hsm.config), env={PIN_ENV: PIN}
    )
    try:
        yield proc
    finally:
        if proc.proc.poll() is None:
            try:
                proc.stop()
            except subprocess.TimeoutExpired:
                proc.kill()


# The HSM worker processes: children of the server process.


def hsm_workers(server: ServerProcess) -> dict[int, str]:
    """The server's live HSM workers: pid to the label of the key each signs
    with, which the server logs as each worker becomes ready."""
    labels: dict[int, str] = {}
    for line in server.log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            record = json.loads(line)
            if record.get("message") == "HSM worker ready":
                labels[int(record["pid"])] = str(record["key"])
    return {pid: labels.get(pid, "?") for pid in spawned_children(server.proc.pid)}


def workers_lost(server: ServerProcess) -> dict[str, float]:
    """`logserver_signing_workers_lost_total` by role, from /metrics."""
    lost: dict[str, float] = {}
    for line in server.get("metrics").decode().splitlines():
        found = re.fullmatch(
            r"logserver_signing_workers_lost_total\{(.*)\} (\S+)", line
        )
        if found:
            role = re.search(r'role="(\w+)"', found[1])
            assert role is not None, line
            lost[role[1]] = lost.get(role[1], 0.0) + float(found[2])
    return lost


def signal_workers(
    server: ServerProcess, signum: signal.Signals, label: str | None = None
) -> list[int]:
    """Send `signum` to the server's HSM workers (those of one key, or all)."""
    workers = hsm_workers(server)
    pids = [pid for pid, key in workers.items() if label in (None, key)]
    assert pids, f"no HSM worker for {label}: {workers}"
    for pid in pids:
        os.kill(pid, signum)
    return pids


def maps(pid: int) -> str:
    """The files process `pid` has mapped: its shared libraries among them."""
    return Path(f"/proc/{pid}/maps").read_text()


def alive(pids: Iterable[int]) -> list[int]:
    return [pid for pid in pids if Path(f"/proc/{pid}").exists()]


@contextlib.contextmanager
def token_moved_away(store: SoftHsmStore) -> Iterator[None]:
    """The token directory renamed away, as if the HSM were unplugged."""
    away = store.tokens.with_name("tokens.away")
    store.tokens.rename(away)
    try:
        yield
    finally:
        away.rename(store.tokens)


# Talking to the server.


@dataclass
class Answer:
    status: int  # 0: no HTTP answer (connection error or timeout)
    body: Any
    retry_after: str | None
    started: float
    ended: float
    error: str = ""


class LogClient:
    """An aiohttp client that keeps every answer's text, to look for the PIN."""

    def __init__(self, session: aiohttp.ClientSession, server: ServerProcess) -> None:
        self.session = session
        self.url = server.url
        self.headers = {"Authorization": f"Bearer {server.token}"}
        self.texts: list[str] = []

    async def post(self, path: str, body: Any) -> Answer:
        started = time.monotonic()
        try:
            async with self.session.post(
                self.url + path, json=body, headers=self.headers
            ) as response:
                text = await response.text()
                retry_after = response.headers.get("Retry-After")
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            return Answer(0, None, None, started, time.monotonic(), repr(exc))
        self.texts.append(text)
        return Answer(status, json.loads(text), retry_after, started, time.monotonic())

    async def get(self, path: str) -> bytes:
        async with self.session.get(self.url + path) as response:
            body = await response.read()
            assert response.status == 200, (path, response.status, body[:300])
        self.texts.append(body.decode("utf-8", "replace"))
        return body

    async def get_json(self, path: str) -> Any:
        return json.loads(await self.get(path))


@contextlib.asynccontextmanager
async def log_client(server: ServerProcess) -> AsyncIterator[LogClient]:
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    connector = aiohttp.TCPConnector(limit=64)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        yield LogClient(session, server)


def submission(name: str, digest: str) -> dict[str, Any]:
    return {"artifact": {"name": name, "sha256": digest}}


def answer_entries(answer: Answer) -> list[dict[str, Any]]:
    """The Entry objects of a single or batch answer."""
    entries: list[dict[str, Any]] = answer.body.get("entries", [answer.body])
    return entries


# Checking what the log answered and what it holds.


class EntryChecker:
    """Verifies entries: signature, inclusion proof and checkpoint signature."""

    def __init__(self, public_key: PublicKeyTypes, vkey: str) -> None:
        self.public_key = public_key
        self.key_id = public_key_id(public_key)
        self.vkey = vkey
        self.verifier = NoteVerifier.from_key(vkey)
        self._checkpoints: dict[str, SignedCheckpoint] = {}

    @classmethod
    def published_by(cls, server: ServerProcess) -> EntryChecker:
        """A checker for the keys in `data/public/`."""
        public = server.data / "public"
        pem = (public / f"{KEY_NAME}.pem").read_bytes()
        vkey = (public / "log.vkey").read_text().strip()
        return cls(serialization.load_pem_public_key(pem), vkey)

    def checkpoint(self, note: str) -> SignedCheckpoint:
        if note not in self._checkpoints:
            self._checkpoints[note] = open_checkpoint(note.encode(), self.verifier)
        return self._checkpoints[note]

    def leaf(self, leaf: bytes, digest: str) -> None:
        """Check that a leaf is for `digest` and its signature verifies."""
        parsed = parse_leaf(leaf)
        assert parsed.artifact.sha256 == digest
        assert parsed.signature.key_id == self.key_id
        verify_artifact_signature(
            self.public_key,
            parsed.signature.algorithm,
            bytes.fromhex(digest),
            base64.b64decode(parsed.signature.value),
        )

    def entry(self, entry: dict[str, Any], digest: str) -> int:
        """Check one Entry object completely; its index."""
        leaf = base64.b64decode(entry["leaf"])
        self.leaf(leaf, digest)
        assert base64.b64decode(entry["leaf_hash"]) == leaf_hash(leaf)
        checkpoint = self.checkpoint(entry["checkpoint"]).checkpoint
        proof = entry["inclusion_proof"]
        index: int = entry["index"]
        assert proof["index"] == index
        assert proof["tree_size"] == checkpoint.size > index
        verify_inclusion(
            leaf_hash(leaf),
            index,
            checkpoint.size,
            [base64.b64decode(h) for h in proof["hashes"]],
            checkpoint.root_hash,
        )
        return index


async def all_leaves(client: LogClient, size: int) -> list[bytes]:
    """Every leaf of the published tree, read from the entry bundles."""
    leaves: list[bytes] = []
    for bundle in range(-(-size // TILE_WIDTH)):
        width = min(TILE_WIDTH, size - bundle * TILE_WIDTH)
        data = await client.get(entries_path(bundle, width))
        leaves += parse_entry_bundle(data, width)
    return leaves


def assert_no_pin(server: ServerProcess, client: LogClient, *files: Path) -> None:
    """The PIN is in no answer, no file of the log (its database included),
    not in the server's output and on no command line."""
    for text in client.texts:
        assert PIN not in text
    paths = [p for p in server.data.rglob("*") if p.is_file()]
    for path in [*paths, server.log, *files]:
        assert PIN.encode() not in path.read_bytes(), path
    for pid in [server.proc.pid, *hsm_workers(server)]:
        with contextlib.suppress(FileNotFoundError):
            assert PIN.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()


# (a) End to end, the way a user runs it.


async def test_log_signs_with_both_keys_in_the_hsm(
    hsm: HsmSetup, server: ServerProcess, tmp_path: Path
) -> None:
    require_openssl()
    public = server.data / "public"
    workers = hsm_workers(server)
    assert sorted(workers.values()) == sorted([ARTIFACT_LABEL] * 2 + [CHECKPOINT_LABEL])
    # The PKCS#11 module is loaded by the workers only, never by the process
    # that runs the event loop.
    module = hsm.module_file()
    assert module not in maps(server.proc.pid)
    assert all(module in maps(pid) for pid in workers)

    # The public halves as `signer key` exports them from the token.
    exported_pem = tmp_path / "exported.pem"
    run_signer(
        "key", "export-pem", *hsm.token_args(), "--label", ARTIFACT_LABEL,
        "--output", str(exported_pem),
    )  # fmt: skip
    vkey = run_signer(
        "key", "export-vkey", *hsm.token_args(), "--label", CHECKPOINT_LABEL,
        "--name", ORIGIN,
    ).strip()  # fmt: skip
    assert (public / "log.vkey").read_text() == vkey + "\n"
    assert (public / f"{KEY_NAME}.pem").read_bytes() == exported_pem.read_bytes()
    public_key = serialization.load_pem_public_key(exported_pem.read_bytes())
    assert public_key_id(public_key) == hsm.artifact_key_id
    with pytest.MonkeyPatch.context() as env:
        env.setenv(PIN_ENV, PIN)
        listing = json.loads(
            run_signer("key", "list", *hsm.token_args(), "--pin-env", PIN_ENV, "--json")
        )
    key_ids = {key["label"]: key["key_id"] for key in listing}
    assert key_ids[ARTIFACT_LABEL] == hsm.artifact_key_id
    checker = EntryChecker(public_key, vkey)

    # Real files: one submitted alone, the others in one batch request.
    files = []
    for i, size in enumerate([0, 1, 70_000, 1_000_003]):
        path = tmp_path / f"artifact-{i}.bin"
        path.write_bytes(os.urandom(size))
        files.append(path)
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    other = tmp_path / "other.bin"  # no signature of the log is over this file
    other.write_bytes(b"not an artifact of the log\n")
    async with log_client(server) as client:
        first = await client.post(
            "api/v1/entries", submission(files[0].name, digests[files[0]])
        )
        assert first.status == 201, first.body
        batch = await client.post(
            "api/v1/entries/batch",
            {"entries": [submission(p.name, digests[p]) for p in files[1:]]},
        )
        assert batch.status == 201, batch.body
        again = await client.post(
            "api/v1/entries", submission(files[0].name, digests[files[0]])
        )
        assert again.status == 200 and again.body["index"] == first.body["index"]

        entries = answer_entries(first) + answer_entries(batch)
        indexes = set()
        for path, entry in zip(files, entries, strict=True):
            indexes.add(checker.entry(entry, digests[path]))
            leaf = parse_leaf(base64.b64decode(entry["leaf"]))
            signature = tmp_path / f"{path.name}.sig"
            signature.write_bytes(base64.b64decode(leaf.signature.value))
            for pem in (public / f"{KEY_NAME}.pem", exported_pem):
                openssl_verify(pem, signature, path)
            openssl_verify(exported_pem, signature, other, ok=False)
        assert indexes == set(range(len(files)))

        # The published checkpoint and key list.
        signed = checker.checkpoint((await client.get("checkpoint")).decode())
        assert signed.checkpoint.size == len(files)
        keys = await client.get_json("api/v1/keys")
        assert keys["checkpoint_key"] == vkey
        published = [
            (k["name"], k["key_id"], k["status"]) for k in keys["artifact_keys"]
        ]
        assert published == [(KEY_NAME, hsm.artifact_key_id, "default")]
        await client.get("healthz")
        await client.get("metrics")
    audit(server, vkey)
    assert_no_pin(server, client, hsm.config)

    assert server.stop() == 0
    # Each worker closed its session and exited with the server.
    await wait_until("the HSM workers exit", lambda: not alive(workers), 10)
    assert PIN.encode() not in server.log.read_bytes()


# (b) and (c): submissions from many concurrent clients.


@dataclass
class Outcome:
    """One request of the load and what came back."""

    body: dict[str, Any]
    digests: list[str]
    answer: Answer

    @property
    def path(self) -> str:
        return "api/v1/entries/batch" if "entries" in self.body else "api/v1/entries"


@dataclass
class Load:
    """Clients that submit fresh digests, alone or in batches, until stopped."""

    client: LogClient
    clients: int = 16
    batch_every: int = 4  # every 4th request of a client is a batch
    batch_size: int = 20
    outcomes: list[Outcome] = field(default_factory=list)
    _numbers: Iterator[int] = field(default_factory=itertools.count)

    def _request(self, size: int) -> tuple[dict[str, Any], list[str]]:
        digests = [
            hashlib.sha256(b"hsm-load/%d" % next(self._numbers)).hexdigest()
            for _ in range(size)
        ]
        items = [submission(f"load-{d[:12]}.bin", d) for d in digests]
        return (items[0] if size == 1 else {"entries": items}), digests

    async def _client(self, number: int, stop: asyncio.Event, limit: int) -> None:
        for request in range(limit):
            if stop.is_set():
                return
            batch = (request + number) % self.batch_every == 0
            body, digests = self._request(self.batch_size if batch else 1)
            outcome = Outcome(body, digests, Answer(0, None, None, 0, 0))
            outcome.answer = await self.client.post(outcome.path, body)
            self.outcomes.append(outcome)
            if outcome.answer.status == 503:
                # As a client honouring Retry-After would, only sooner.
                await asyncio.sleep(min(0.5, float(outcome.answer.retry_after or 1)))

    async def run(self, stop: asyncio.Event, limit: int = 1_000_000) -> None:
        await asyncio.gather(
            *(self._client(i, stop, limit) for i in range(self.clients))
        )

    def since(self, moment: float) -> list[Outcome]:
        """The requests sent at or after `moment` that have been answered."""
        return [o for o in self.outcomes if o.answer.started >= moment]

    def successes_since(self, moment: float) -> int:
        return sum(o.answer.status in (200, 201) for o in self.since(moment))

    def refusals_since(self, moment: float) -> int:
        return sum(
            o.answer.status == 503 for o in self.outcomes if o.answer.ended >= moment
        )


def check_answers(outcomes: Iterable[Outcome]) -> None:
    """Each answer is 2xx or a proper 503: no 500, no hang, no broken connection."""
    for outcome in outcomes:
        answer = outcome.answer
        assert answer.status in (200, 201, 503), (
            answer.status,
            answer.body,
            answer.error,
        )
        assert answer.ended - answer.started < REQUEST_TIMEOUT
        if answer.status == 503:
            assert answer.body["error"]["code"] == "unavailable", answer.body
            assert answer.retry_after is not None and answer.retry_after.isdigit()
            assert int(answer.retry_after) >= 1


async def settle_and_check(
    server: ServerProcess, client: LogClient, load: Load, checker: EntryChecker
) -> int:
    """Retry what was answered 503, then check the log holds each digest once.

    A 503 does not say whether the entry was logged (a batch can fail after
    its transaction committed), so every refused request is sent again until
    it is answered; the same request is never logged twice. Returns how many
    refused requests turned out to be logged already (answered 200).
    """
    check_answers(load.outcomes)
    final: dict[str, dict[str, Any]] = {}
    slots = asyncio.Semaphore(16)
    logged_before = 0

    async def settle(outcome: Outcome) -> None:
        nonlocal logged_before
        deadline = time.monotonic() + 30
        while outcome.answer.status == 503:
            assert time.monotonic() < deadline, outcome.answer.body
            async with slots:
                outcome.answer = await client.post(outcome.path, outcome.body)
            check_answers([outcome])
            if outcome.answer.status == 503:
                await asyncio.sleep(0.1)
            elif outcome.answer.status == 200:
                logged_before += 1
        entries = answer_entries(outcome.answer)
        final.update(zip(outcome.digests, entries, strict=True))

    await asyncio.gather(*(settle(outcome) for outcome in load.outcomes))

    # Each digest is one entry; the tree holds exactly these entries.
    indexes = {checker.entry(entry, digest) for digest, entry in final.items()}
    assert len(indexes) == len(final)
    size = (await client.get_json("healthz"))["tree_size"]
    signed = checker.checkpoint((await client.get("checkpoint")).decode())
    assert size == signed.checkpoint.size == len(final)
    assert indexes == set(range(size))

    # Every leaf the log serves carries a signature that verifies.
    by_index = {entry["index"]: digest for digest, entry in final.items()}
    for index, leaf in enumerate(await all_leaves(client, size)):
        checker.leaf(leaf, by_index[index])
    await asyncio.to_thread(audit, server, checker.vkey)
    assert server.proc.poll() is None, "the server died"
    return logged_before


async def test_concurrent_single_and_batch_submissions_all_verify(
    server: ServerProcess,
) -> None:
    checker = EntryChecker.published_by(server)
    async with log_client(server) as client:
        load = Load(client, clients=32, batch_every=3, batch_size=50)
        await load.run(asyncio.Event(), limit=8)
        assert len(load.outcomes) == 32 * 8
        refused = [o.answer for o in load.outcomes if o.answer.status != 201]
        assert not refused, refused[:3]
        await settle_and_check(server, client, load, checker)
    assert_no_pin(server, client)
    assert server.stop() == 0


# (c) The HSM breaks while submissions run.


async def test_hsm_failures_mid_load_give_503_and_the_log_recovers(
    hsm: HsmSetup, server: ServerProcess
) -> None:
    checker = EntryChecker.published_by(server)
    stopped: list[int] = []
    async with log_client(server) as client:
        load = Load(client)
        stop = asyncio.Event()
        running = asyncio.create_task(load.run(stop))
        try:
            await wait_until("load runs", lambda: load.successes_since(0) >= 50, 15)

            # 1. Every worker of both keys killed, mid-signature.
            assert workers_lost(server) == {"artifact": 0.0, "checkpoint": 0.0}
            killed = signal_workers(server, signal.SIGKILL)
            broken = time.monotonic()
            await wait_until("a 503", lambda: load.refusals_since(broken) > 0, 10)
            await wait_until(
                "recovery", lambda: load.successes_since(broken + 0.5) >= 50, 20
            )
            assert not set(killed) & set(hsm_workers(server))
            lost = workers_lost(server)
            assert lost["artifact"] >= 1 and lost["checkpoint"] >= 1, lost

            # 2. The checkpoint key's worker hangs: batches commit, but their
            # checkpoint is not signed within its timeout, so they are answered
            # 503; the hung worker is replaced.
            stopped = signal_workers(server, signal.SIGSTOP, CHECKPOINT_LABEL)
            broken = time.monotonic()
            await wait_until(
                "a 503", lambda: load.refusals_since(broken) > 0, CHECKPOINT_TIMEOUT + 5
            )
            await wait_until(
                "recovery", lambda: load.successes_since(broken + 0.5) >= 50, 20
            )
            assert not set(stopped) & set(hsm_workers(server))

            # 3. The token gone: the workers die, their replacements cannot log
            # in, and every submission is refused until the token is back.
            with token_moved_away(hsm.store):
                signal_workers(server, signal.SIGKILL)
                broken = time.monotonic()
                await wait_until(
                    "answers without the token",
                    lambda: len(load.since(broken + 0.1)) >= 10,
                    REQUEST_TIMEOUT,
                )
                outage = load.since(broken + 0.1)
                assert all(o.answer.status == 503 for o in outage)
            back = time.monotonic()
            await wait_until("recovery", lambda: load.successes_since(back) >= 50, 30)
        finally:
            stop.set()
            await asyncio.wait_for(running, REQUEST_TIMEOUT + 5)
            for pid in alive(stopped):  # should the server not have killed it
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        logged_before = await settle_and_check(server, client, load, checker)
    # Step 2 refused entries that were durable already; their retries found them.
    assert logged_before > 0
    assert_no_pin(server, client)
    assert server.stop() == 0


async def test_token_lost_under_open_sessions_then_back_recovers(
    hsm: HsmSetup, server: ServerProcess
) -> None:
    checker = EntryChecker.published_by(server)
    async with log_client(server) as client:
        load = Load(client)
        stop = asyncio.Event()
        running = asyncio.create_task(load.run(stop))
        try:
            await wait_until("load runs", lambda: load.successes_since(0) >= 50, 15)
            # The token goes away under the workers' logged-in sessions.
            with token_moved_away(hsm.store):
                broken = time.monotonic()
                await wait_until(
                    "answers without the token",
                    lambda: len(load.since(broken + 0.1)) >= 10,
                    REQUEST_TIMEOUT,
                )
                outage = load.since(broken + 0.1)
                assert all(o.answer.status == 503 for o in outage)
            back = time.monotonic()
            await wait_until("recovery", lambda: load.successes_since(back) >= 50, 10)
        finally:
            stop.set()
            await asyncio.wait_for(running, REQUEST_TIMEOUT + 5)
        await settle_and_check(server, client, load, checker)
    assert server.stop() == 0
