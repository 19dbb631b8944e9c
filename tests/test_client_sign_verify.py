"""`signer sign` against a real log server, then `verifier verify` offline.

The server is a `logserver serve` subprocess. `signer sign` runs through its
`add_parser`/`run` pair on a small parser of our own, `verifier` through
`verifier.cli.main`, both in this process so that a test can take the
network away.
"""

from __future__ import annotations

import argparse
import asyncio
import http.server
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from logserver.app import create_app
from logserver.auth import TOKEN_ISSUER
from signer import sign_cmd
from tests.govern import Tokens, governed_config
from tests.serverproc import ServerProcess
from verifier.bundle import parse_bundle
from verifier.cli import main as verifier
from verifier.note import verifier_key

ORIGIN = "sign.example/log"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    process = ServerProcess(tmp_path_factory.mktemp("log") / "data", "--origin", ORIGIN)
    yield process
    assert process.stop() == 0


@pytest.fixture(autouse=True)
def no_ci_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "SIGNER_TOKEN",
        "SIGNER_LOG_KEY",
        "SIGNER_ID_TOKEN",
        "CI_JOB_JWT_V2",
        "ACTIONS_ID_TOKEN_REQUEST_URL",
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN",
    ):
        monkeypatch.delenv(name, raising=False)


def sign(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="signer")
    sign_cmd.add_parser(parser.add_subparsers())
    args = parser.parse_args(["sign", *argv])
    code: int = args.run(args)
    return code


def vkey(server: ServerProcess) -> str:
    return str(server.data / "public" / "log.vkey")


def pem(server: ServerProcess) -> str:
    return str(server.data / "public" / "default.pem")


def files(directory: Path, *names: str) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        path = directory / name
        path.write_bytes(f"contents of {name}\n".encode() * 1000)
        paths.append(path)
    return paths


def tree_size(server: ServerProcess) -> int:
    size: int = json.loads(server.get("healthz"))["tree_size"]
    return size


class NetworkUsed(AssertionError):
    pass


def block_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Make every socket connection fail, and record the attempts."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise NetworkUsed(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


# --- Signing and verifying ------------------------------------------------------------


def test_sign_several_files_then_verify_each_offline(
    server: ServerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    artifacts = files(tmp_path, "a.tar.gz", "b.whl", "c.bin")
    before = tree_size(server)
    monkeypatch.setenv("SIGNER_TOKEN", server.token)
    code = sign(*map(str, artifacts), "--log", server.url, "--log-key", vkey(server))
    out, err = capsys.readouterr()
    assert code == 0, err
    assert tree_size(server) == before + 3
    for path in artifacts:
        assert f"signed {path} -> {path}.sigbundle" in out
        assert Path(f"{path}.sigbundle").is_file()
    assert "trusting the key the log publishes" not in err

    with monkeypatch.context() as m:
        attempts = block_network(m)
        for path in artifacts:
            code = verifier(
                ["verify", str(path), "--log-key", vkey(server), "--key", pem(server)]
            )
            out, err = capsys.readouterr()
            assert code == 0, err
            assert out.startswith(f"verified {path}: entry ") and ORIGIN in out
        code = verifier(
            ["verify", str(artifacts[1]), "--log-key", vkey(server),
             "--key", pem(server), "--json"]
        )  # fmt: skip
        result = json.loads(capsys.readouterr().out)
    assert attempts == []
    assert code == 0 and result["verified"] is True
    assert set(result["steps"].values()) == {"passed"}
    assert result["entry"]["leaf"]["artifact"]["name"] == "b.whl"
    assert result["entry"]["origin"] == ORIGIN


def test_sign_json_output_dir_and_claims(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (artifact,) = files(tmp_path / "dist", "app.tar.gz")
    out_dir = tmp_path / "bundles"
    out_dir.mkdir()
    code = sign(
        str(artifact), "--log", server.url, "--token", server.token,
        "--output", str(out_dir), "--json", "--progress",
        "--source-repository", "https://git.example/acme/app",
        "--source-ref", "refs/tags/v1", "--builder", "ci.example/runner",
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "trusting the key the log publishes" in err
    assert "hashing 1/1 files" in err
    (result,) = json.loads(out)
    bundle = out_dir / "app.tar.gz.sigbundle"
    assert result["status"] == "signed" and result["bundle"] == str(bundle)
    assert result["size"] == artifact.stat().st_size
    assert bundle.is_file() and not Path(f"{artifact}.sigbundle").exists()

    def verify(*extra: str) -> tuple[int, str]:
        code = verifier(
            ["verify", str(artifact), "--bundle", str(bundle),
             "--log-key", vkey(server), "--key", pem(server), *extra]
        )  # fmt: skip
        return code, capsys.readouterr().err

    assert verify("--expect-repository", "https://git.example/acme/app")[0] == 0
    assert (
        verify("--expect-ref", "refs/tags/v1", "--expect-builder", "ci.example/runner")[
            0
        ]
        == 0
    )
    assert (
        verify(
            "--expect-identity", "bootstrap", "--expect-rule", "builtin-bootstrap-token"
        )[0]
        == 0
    )
    code, err = verify("--expect-repository", "https://git.example/evil/app")
    assert code == 1
    assert (
        "step 5 (expectations): expected repository 'https://git.example/evil/app'"
        in err
    )


def test_sign_reports_a_bundle_it_cannot_write_and_leaves_nothing_behind(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (artifact,) = files(tmp_path / "dist", "app.tar.gz")
    out_dir = tmp_path / "bundles"
    (out_dir / "app.tar.gz.sigbundle").mkdir(parents=True)  # in the way
    code = sign(
        str(artifact), "--log", server.url, "--token", server.token,
        "--log-key", vkey(server), "--output", str(out_dir),
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code != 0
    assert f"cannot write {out_dir / 'app.tar.gz.sigbundle'}" in err
    assert [p.name for p in out_dir.iterdir()] == ["app.tar.gz.sigbundle"]


def test_verify_exit_codes(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (artifact,) = files(tmp_path, "tool")
    assert sign(str(artifact), "--log", server.url, "--token", server.token) == 0
    capsys.readouterr()
    base = ["verify", str(artifact), "--log-key", vkey(server), "--key", pem(server)]

    def run(*argv: str) -> tuple[int, str]:
        code = verifier(list(argv))
        return code, capsys.readouterr().err

    assert run(*base)[0] == 0
    # Usage errors: 2.
    assert run("verify", str(artifact), "--log-key", vkey(server))[0] == 2
    code, err = run(*base, "--online")
    assert code == 2 and "--online needs --log URL" in err
    code, err = run("verify", str(tmp_path / "absent"), *base[2:])
    assert code == 2 and "No such file" in err
    code, err = run(*base[:2], "--log-key", "not-a-key", *base[4:])
    assert code == 2 and "--log-key" in err
    assert run("--version")[0] == 0
    # Verification failures: 1.
    artifact.write_bytes(artifact.read_bytes() + b"!")
    code, err = run(*base)
    assert code == 1 and "step 1 (digest)" in err
    bundle = Path(f"{artifact}.sigbundle")
    bundle.write_text("{}")
    code, err = run(*base)
    assert code == 1 and "the bundle does not parse" in err


def test_verify_online(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (artifact,) = files(tmp_path, "online.bin")
    assert sign(str(artifact), "--log", server.url, "--token", server.token) == 0
    # The log grows after the bundle was made.
    others = files(tmp_path / "more", *(f"x{i}" for i in range(300)))
    assert sign(*map(str, others), "--log", server.url, "--token", server.token) == 0
    capsys.readouterr()
    code = verifier(
        ["verify", str(artifact), "--log-key", vkey(server), "--key", pem(server),
         "--online", "--log", server.url, "--json"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    result = json.loads(out)
    assert result["steps"]["online"] == "passed"
    assert result["online"]["tree_size"] == tree_size(server)
    assert result["online"]["tree_size"] > result["entry"]["tree_size"]
    assert result["online"]["consistency_proof"]


# --- What the signer refuses ----------------------------------------------------------


def test_sign_refuses_an_answer_from_another_log_key(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (artifact,) = files(tmp_path, "pinned.bin")
    public = Ed25519PrivateKey.generate().public_key().public_bytes_raw()
    other = verifier_key(ORIGIN, public)
    code = sign(
        str(artifact), "--log", server.url, "--token", server.token, "--log-key", other
    )
    err = capsys.readouterr().err
    assert code == 1
    assert "the log's answer does not verify" in err
    assert "not signed by the trusted log key" in err
    assert not Path(f"{artifact}.sigbundle").exists()


def test_sign_token_errors(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (artifact,) = files(tmp_path, "t.bin")
    assert sign(str(artifact), "--log", server.url) == 2
    assert "no token: give --token" in capsys.readouterr().err
    assert sign(str(artifact), "--log", server.url, "--token", "wrong") == 1
    err = capsys.readouterr().err
    assert "401 the bearer token is not valid for this log" in err
    assert sign(str(tmp_path / "absent"), "--log", server.url, "--token", "x") == 2
    assert sign(str(artifact), "--log", "ftp://x/", "--token", "x") == 2


def test_sign_submits_in_batches(
    server: ServerProcess,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sign_cmd, "BATCH_SIZE", 2)
    sizes: list[int] = []
    submit = sign_cmd.LogClient.submit

    def spy(self: sign_cmd.LogClient, requests: Any, token: str) -> Any:
        sizes.append(len(requests))
        return submit(self, requests, token)

    monkeypatch.setattr(sign_cmd.LogClient, "submit", spy)
    artifacts = files(tmp_path, *(f"batch{i}" for i in range(5)))
    assert sign(*map(str, artifacts), "--log", server.url, "--token", server.token) == 0
    assert sizes == [2, 2, 1]
    assert all(Path(f"{p}.sigbundle").is_file() for p in artifacts)


# --- Retries --------------------------------------------------------------------------


class FlakyProxy(http.server.BaseHTTPRequestHandler):
    """Forwards to the log; the first POST gets a 503, the second a dropped line."""

    protocol_version = "HTTP/1.1"
    upstream: ClassVar[str] = ""
    posts: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self._forward(None)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.posts.append(self.path)
        if len(self.posts) == 1:
            payload = b'{"error":{"code":"unavailable","message":"busy"}}'
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
        elif len(self.posts) == 2:
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
        else:
            self._forward(body)

    def _forward(self, body: bytes | None) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        request = urllib.request.Request(
            self.upstream + self.path.lstrip("/"), body, headers, method=self.command
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                status, payload = response.status, response.read()
        except urllib.error.HTTPError as e:
            status, payload = e.code, e.read()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


def test_sign_retries_503_and_lost_connections(
    server: ServerProcess, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    FlakyProxy.upstream, FlakyProxy.posts = server.url, []
    proxy = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FlakyProxy)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        (artifact,) = files(tmp_path, "retry.bin")
        before = tree_size(server)
        url = f"http://127.0.0.1:{proxy.server_address[1]}/"
        code = sign(str(artifact), "--log", url, "--token", server.token)
        err = capsys.readouterr().err
    finally:
        proxy.shutdown()
        proxy.server_close()
    assert code == 0, err
    assert FlakyProxy.posts == ["/api/v1/entries"] * 3
    assert tree_size(server) == before + 1


def test_sign_gives_up_after_bounded_retries(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        port = listener.getsockname()[1]
    (artifact,) = files(tmp_path, "nowhere.bin")
    code = sign(
        str(artifact), "--log", f"http://127.0.0.1:{port}/", "--token", "x",
        "--retries", "1",
    )  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "cannot reach" in err and "gave up after 2 attempts" in err


# --- CI identity tokens ---------------------------------------------------------------


def test_ci_identity_token_from_gitlab_and_github() -> None:
    assert sign_cmd.ci_identity_token("logsign", {}) is None
    assert sign_cmd.ci_identity_token("logsign", {"CI_JOB_JWT_V2": "jwt-2"}) == (
        "CI_JOB_JWT_V2",
        "jwt-2",
    )
    seen: list[tuple[str, str | None]] = []

    class Issuer(http.server.BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            seen.append((self.path, self.headers["Authorization"]))
            payload = b'{"count": 1, "value": "github-jwt"}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    issuer = http.server.HTTPServer(("127.0.0.1", 0), Issuer)
    threading.Thread(target=issuer.serve_forever, daemon=True).start()
    try:
        env = {
            "ACTIONS_ID_TOKEN_REQUEST_URL": (
                f"http://127.0.0.1:{issuer.server_address[1]}/token?api-version=2.0"
            ),
            "ACTIONS_ID_TOKEN_REQUEST_TOKEN": "request-token",
        }
        found = sign_cmd.ci_identity_token("my log", env)
    finally:
        issuer.shutdown()
        issuer.server_close()
    assert found == ("GitHub Actions", "github-jwt")
    assert seen == [
        ("/token?api-version=2.0&audience=my%20log", "Bearer request-token")
    ]


async def test_sign_waits_for_a_builder_quorum(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    policy = f"""
version = 1
[[rules]]
name = "reproducible"
artifacts = "lib-*"
keys = "default"
match = {{ issuer = "{TOKEN_ISSUER}", subject = "builder-*" }}
quorum = {{ builders = 2, window_seconds = 600 }}
"""
    tokens = Tokens.create(tmp_path / "tokens", "builder-1", "builder-2")
    config = governed_config(
        tmp_path, f"sqlite:///{tmp_path / 'log.db'}", policy, tokens
    )
    server = await aiohttp_server(create_app(config))
    url = str(server.make_url("/"))
    log_key = str(config.data / "public" / "log.vkey")
    (artifact,) = files(tmp_path / "build", "lib-1.0.tar.gz")

    def builder(name: str) -> int:
        out = tmp_path / name
        out.mkdir()
        return sign(
            str(artifact), "--log", url, "--log-key", log_key,
            "--token", tokens.tokens[name], "--output", str(out),
            "--source-repository", "acme/lib", "--source-commit", "c" * 40,
            "--wait", "30",
        )  # fmt: skip

    # The first builder is parked until the second reports the same digest.
    first = asyncio.create_task(asyncio.to_thread(builder, "builder-1"))
    await asyncio.sleep(1)
    assert not first.done()
    assert await asyncio.to_thread(builder, "builder-2") == 0
    assert await first == 0
    bundles = [
        parse_bundle((tmp_path / name / "lib-1.0.tar.gz.sigbundle").read_bytes())
        for name in ("builder-1", "builder-2")
    ]
    assert bundles[0].proof.index == bundles[1].proof.index
