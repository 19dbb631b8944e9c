"""Secrets never reach logs, metrics, error bodies or public files.

One full session of a real server whose keys are in a SoftHSM2 token, with
the PIN in its environment: known bearer tokens (bootstrap, admin, a named
token from a tokens file) and a CI OIDC token (a JWT, itself a bearer
credential). The server logs JSON at -vv (debug and access logs). The
session signs through every identity, makes every kind of error (wrong,
truncated and misplaced tokens, a token followed by a byte HTTP forbids,
denials, bad bodies), reads /metrics, the audit table and every public
route, reloads the policy on SIGHUP, kills an HSM worker, stops, and then
tries to start with a wrong PIN. `signer sign` runs against it too.

Every byte any of that produced (the server's log, every response's status
line, headers and body, the files under DATA/public, the client's output
and bundle) is scanned for each secret, and for the JWT's signature part on
its own.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from logserver.auth import new_token_line
from signer import cli as signer_cli
from tests.faults import figures_line
from tests.govern import AUDIENCE, GITHUB, Issuer, github_claims
from tests.serverproc import ServerProcess, free_port
from tests.softhsm import SoftHsmStore

PIN_ENV = "LOGSIGN_SECRETS_TEST_PIN"
PIN = "pin-" + secrets.token_hex(6)
SO_PIN = "so-" + secrets.token_hex(6)
WRONG_PIN = "wrong-" + secrets.token_hex(6)
BOOTSTRAP = secrets.token_urlsafe(32)
ADMIN = secrets.token_urlsafe(32)

POLICY = """\
version = 1

[[rules]]
name = "tokens"
artifacts = "app-*"
keys = "*"
match = { issuer = "logserver/token" }

[[rules]]
name = "ci"
artifacts = "app-*"
keys = "*"
match = { issuer = "https://token.actions.githubusercontent.com" }
"""

CONFIG = """\
origin = "secrets.example/log"
policy = "{policy}"
tokens = "{tokens}"
default_artifact_key = "release"

[checkpoint_key]
backend = "pkcs11"
algorithm = "ed25519"
pkcs11 = {{ module = "{module}", token_label = "{token}", key_label = "checkpoint", pin_env = "{pin_env}", workers = 1 }}

[artifact_keys.release]
backend = "pkcs11"
pkcs11 = {{ module = "{module}", token_label = "{token}", key_label = "release", pin_env = "{pin_env}", workers = 2, timeout = 5 }}

[[oidc.issuers]]
issuer = "{issuer}"
audience = "{audience}"
provider = "github"
jwks_file = "{jwks}"
"""  # noqa: E501


class Transcript:
    """Everything the session saw, to be scanned at the end."""

    def __init__(self) -> None:
        self.chunks: list[tuple[str, bytes]] = []

    def add(self, where: str, data: bytes | str) -> None:
        self.chunks.append((where, data if isinstance(data, bytes) else data.encode()))

    def request(
        self,
        url: str,
        method: str = "GET",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes]:
        request = urllib.request.Request(url, body, headers or {}, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, head, data = response.status, response.headers, response.read()
        except urllib.error.HTTPError as exc:
            status, head, data = exc.code, exc.headers, exc.read()
        self.add(f"{method} {url} -> {status}", f"{status}\n{head}\n".encode() + data)
        return status, data

    def raw(self, port: int, data: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
            sock.sendall(data)
            received = b""
            with contextlib.suppress(OSError):
                while chunk := sock.recv(65536):
                    received += chunk
        self.add("raw request", received)
        return received


def _children(pid: int) -> list[int]:
    """The server's spawned HSM worker processes."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                if ppid == pid and b"spawn_main" in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
    return found


@pytest.fixture
def hsm_config(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str], Issuer]]:
    with SoftHsmStore(tmp_path / "softhsm") as store:
        token = store.create_token("logsign-secrets", pin=PIN, so_pin=SO_PIN)
        args = ["--module", token.module, "--token", token.label]
        os.environ[PIN_ENV] = PIN
        try:
            for label, algorithm in (
                ("checkpoint", "ed25519"),
                ("release", "ecdsa-p256"),
            ):
                out, err = io.StringIO(), io.StringIO()
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                    code = signer_cli.main(
                        ["key", "generate", *args, "--label", label,
                         "--algorithm", algorithm, "--pin-env", PIN_ENV]
                    )  # fmt: skip
                assert code == 0, err.getvalue()
                assert PIN not in out.getvalue() + err.getvalue()
        finally:
            del os.environ[PIN_ENV]
        issuer = Issuer()
        jwks = tmp_path / "jwks.json"
        jwks.write_text(json.dumps(issuer.jwks()))
        policy = tmp_path / "policy.toml"
        policy.write_text(POLICY)
        tokens = tmp_path / "tokens"
        config = tmp_path / "logserver.toml"
        config.write_text(
            CONFIG.format(
                policy=policy, tokens=tokens, module=token.module, token=token.label,
                pin_env=PIN_ENV, issuer=GITHUB, audience=AUDIENCE, jwks=jwks,
            )
        )  # fmt: skip
        named, line = new_token_line("nightly")
        tokens.write_text(line + "\n")
        yield config, {"named": named}, issuer


def test_no_secret_reaches_any_output(
    hsm_config: tuple[Path, dict[str, str], Issuer], tmp_path: Path
) -> None:
    config, made, issuer = hsm_config
    named = made["named"]
    jwt = issuer.token(**github_claims(repository_id=4711))
    wrong_audience = issuer.token(audience="someone-else", **github_claims())
    secret_values = {
        "PIN": PIN, "SO PIN": SO_PIN, "wrong PIN": WRONG_PIN,
        "bootstrap token": BOOTSTRAP, "admin token": ADMIN, "named token": named,
        "JWT": jwt, "JWT signature": jwt.rsplit(".", 1)[1],
        "other JWT signature": wrong_audience.rsplit(".", 1)[1],
    }  # fmt: skip

    data = tmp_path / "data"
    (data / "secrets").mkdir(parents=True, mode=0o700)
    for name, value in (("submit.token", BOOTSTRAP), ("admin.token", ADMIN)):
        path = data / "secrets" / name
        path.write_text(value + "\n")
        path.chmod(0o600)

    seen = Transcript()
    server = ServerProcess(
        data, "--config", str(config), "--log-format", "json", "-vv",
        env={PIN_ENV: PIN},
    )  # fmt: skip
    url = server.url
    statuses: list[int] = []

    def post(path: str, body: object, authorization: str | None, **more: str) -> int:
        headers = {"Content-Type": "application/json", **more}
        if authorization is not None:
            headers["Authorization"] = authorization
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, _ = seen.request(url + path, "POST", raw, headers)
        statuses.append(status)
        return status

    def entry(name: str) -> dict[str, object]:
        digest = base64.b16encode(secrets.token_bytes(32)).decode().lower()
        return {"artifact": {"name": name, "sha256": digest}}

    try:
        # Signing, through every identity.
        assert post("api/v1/entries", entry("app-1"), f"Bearer {BOOTSTRAP}") == 201
        assert post("api/v1/entries", entry("app-2"), f"Bearer {named}") == 201
        assert post("api/v1/entries", entry("app-3"), f"Bearer {jwt}") == 201
        batch = {"entries": [entry(f"app-b{i}") for i in range(5)]}
        assert post("api/v1/entries/batch", batch, f"bearer {BOOTSTRAP}") == 201

        # Every kind of refusal, with the secrets close at hand.
        refusals = [
            ("api/v1/entries", entry("app-4"), f"Bearer {BOOTSTRAP[:-1]}", 401),
            ("api/v1/entries", entry("app-4"), f"Bearer {BOOTSTRAP}x", 401),
            ("api/v1/entries", entry("app-4"), f"Bearer {BOOTSTRAP} {named}", 401),
            ("api/v1/entries", entry("app-4"), f"Basic {BOOTSTRAP}", 401),
            ("api/v1/entries", entry("app-4"), f"Bearer {ADMIN}", 401),
            ("api/v1/entries", entry("app-4"), f"Bearer {wrong_audience}", 401),
            ("api/v1/entries", entry("app-4"), f"Bearer {jwt[:-3]}", 401),
            ("api/v1/entries", entry("app-4"), BOOTSTRAP, 401),
            ("api/v1/entries", entry("other.bin"), f"Bearer {named}", 403),
            ("api/v1/entries", b"{", f"Bearer {BOOTSTRAP}", 400),
            ("api/v1/entries", {"artifact": {}}, f"Bearer {jwt}", 422),
            ("api/v1/entries", {**entry("app-5"), "key": "x"}, f"Bearer {named}", 422),
            ("api/v1/entries", b"x" * (2 << 20), f"Bearer {BOOTSTRAP}", 413),
        ]  # fmt: skip
        for route, body, authorization, expected in refusals:
            assert post(route, body, authorization) == expected, authorization[:12]
        status, _ = seen.request(
            url + "api/v1/entries", "POST", json.dumps(entry("app-6")).encode(),
            {"Authorization": f"Bearer {BOOTSTRAP}", "Content-Type": "text/plain"},
        )  # fmt: skip
        assert status == 415
        # A real token followed by a byte no header may hold: aiohttp's parser
        # refuses it, and its error message quotes the header line.
        answer = seen.raw(
            server.port,
            b"POST /api/v1/entries HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            + f"Authorization: Bearer {BOOTSTRAP}".encode()
            + b"\x7f\r\nContent-Length: 2\r\n\r\n{}",
        )
        assert answer.startswith(b"HTTP/1.") and b" 400 " in answer[:20]
        # aiohttp's HTTP parser answers this itself, before any of our code,
        # quoting the offending header line back to the client that sent it
        # (RELIABILITY.md, "Known limits"). That sender holds the token
        # already; what matters is that nothing else gets it: not the log
        # (checked below), not any other client.
        reflected = seen.chunks.pop()
        assert BOOTSTRAP.encode() in reflected[1]

        # Reads, operations, the audit table.
        for route in (
            "checkpoint",
            "healthz",
            "metrics",
            "api/v1/keys",
            "openapi.json",
            "api/v1/entries/0",
            "tile/entries/000.p/8",
        ):
            assert seen.request(url + route)[0] == 200, route
        admin = {"Authorization": f"Bearer {ADMIN}"}
        status, body = seen.request(url + "api/v1/audit?limit=1000", headers=admin)
        assert status == 200 and len(json.loads(body)["records"]) >= 9
        bootstrap_as_admin = {"Authorization": f"Bearer {BOOTSTRAP}"}
        assert seen.request(url + "api/v1/audit", headers=bootstrap_as_admin)[0] == 401

        # Policy reload; then an HSM worker dies and the log recovers.
        server.proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        workers = _children(server.proc.pid)
        assert workers, "no HSM worker processes found"
        os.kill(workers[-1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while post("api/v1/entries", entry("app-after"), f"Bearer {named}") != 201:
            assert time.monotonic() < deadline, statuses[-5:]
            time.sleep(0.2)

        # The client side: `signer sign`, with the token in its environment.
        artifact = tmp_path / "app-7.tar.gz"
        artifact.write_bytes(b"a release\n")
        vkey = (data / "public" / "log.vkey").read_text().strip()
        sign = subprocess.run(
            [sys.executable, "-m", "signer.cli", "-vv", "sign", str(artifact),
             "--log", url, "--log-key", vkey],
            capture_output=True, timeout=60,
            env={**os.environ, "SIGNER_TOKEN": BOOTSTRAP},
        )  # fmt: skip
        assert sign.returncode == 0, sign.stderr
        seen.add("signer sign output", sign.stdout + sign.stderr)
        bundles = list(tmp_path.glob("app-7.tar.gz*bundle"))
        assert bundles
        for bundle in bundles:
            seen.add(str(bundle), bundle.read_bytes())
    finally:
        code = server.stop()
    assert code == 0
    seen.add("server log", server.log.read_bytes())
    assert b"HSM worker lost" in server.log.read_bytes()
    assert b"malformed request" in server.log.read_bytes()
    for path in sorted((data / "public").rglob("*")):
        if path.is_file():
            seen.add(str(path), path.read_bytes())

    # A start with the wrong PIN fails, and says so without either PIN.
    failed = subprocess.run(
        [sys.executable, "-m", "logserver.cli", "serve", "--data", str(data),
         "--config", str(config), "--listen", f"127.0.0.1:{free_port()}", "-vv"],
        capture_output=True, timeout=60, env={**os.environ, PIN_ENV: WRONG_PIN},
    )  # fmt: skip
    assert failed.returncode == 1, failed.stderr[-2000:]
    seen.add("wrong-PIN start", failed.stdout + failed.stderr)

    leaks = [
        f"{secret} in {where}"
        for where, chunk in seen.chunks
        for secret, value in secret_values.items()
        if value.encode() in chunk
    ]
    assert not leaks, leaks
    for name in ("submit.token", "admin.token", "checkpoint.pem"):
        path = data / "secrets" / name
        if path.exists():
            assert path.stat().st_mode & 0o077 == 0, name
    scanned = sum(len(chunk) for _, chunk in seen.chunks)
    figures_line(
        f"secrets: {len(secret_values)} secret values, {len(seen.chunks)} outputs "
        f"({scanned} bytes: log at -vv JSON, {len(statuses)} write answers, reads, "
        f"metrics, audit, public files, signer output, a wrong-PIN start): 0 leaks"
    )
