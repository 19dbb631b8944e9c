"""Governance over HTTP: denials, the audit table, rate limits, batches, reload."""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import os
import signal
import stat
import time
from pathlib import Path
from typing import Any, NoReturn

import pytest
from aiohttp.test_utils import TestClient

from logserver.app import create_app
from logserver.auth import (
    TOKEN_ISSUER,
    _write_secret,
    load_or_create_token,
    new_token_line,
)
from tests.conftest import log_state, token_header
from tests.govern import (
    Tokens,
    admin_header,
    approvers_toml,
    body_for,
    governed_config,
    make_approvers,
    post,
)
from tests.serverproc import ServerProcess
from verifier.leaf import parse_leaf

POLICY = f"""
version = 1

[rate_limit]
requests_per_minute = 6
burst = 3

{approvers_toml(make_approvers())}

[[rules]]
name = "ci-apps"
artifacts = ["app-*", "lib-*"]
keys = "default"
match = {{ issuer = "{TOKEN_ISSUER}", subject = "ci" }}

[[rules]]
name = "release"
mode = "ceremonial"
artifacts = "release-*"
keys = "default"
match = {{ issuer = "{TOKEN_ISSUER}", subject = "ci" }}
ceremony = {{ approvers = ["alice", "bob"], threshold = 1 }}
"""


@pytest.fixture
def tokens(tmp_path: Path) -> Tokens:
    return Tokens.create(tmp_path / "tokens", "ci", "limited", "other")


@pytest.fixture
async def client(
    aiohttp_client: Any, tmp_path: Path, database_url: str, tokens: Tokens
) -> TestClient:
    config = governed_config(tmp_path, database_url, POLICY, tokens)
    made: TestClient = await aiohttp_client(create_app(config))
    return made


async def audit(client: TestClient, **params: str) -> Any:
    response = await client.get(
        "/api/v1/audit", params=params, headers=admin_header(client)
    )
    assert response.status == 200, await response.text()
    return await response.json()


async def test_denials_are_answered_with_reasons_and_recorded(
    client: TestClient, tokens: Tokens
) -> None:
    _, allowed = await post(client, body_for("app-1"), tokens.header("ci"), 201)
    leaf = parse_leaf(base64.b64decode(allowed["leaf"]))
    assert leaf.identity.subject == "ci" and leaf.policy.rule == "ci-apps"

    _, denied = await post(client, body_for("secret.key"), tokens.header("ci"), 403)
    error = denied["error"]
    assert error["code"] == "denied"
    assert error["details"] == [
        {
            "code": "no_rule",
            "message": "no rule allows logserver/token 'ci' to sign 'secret.key' "
            "with key 'default'",
        }
    ]
    await post(client, body_for("app-2"), tokens.header("other"), 403)
    status, _ = await post(client, body_for("app-2"), {"Authorization": "Bearer x"})
    assert status == 401  # unauthenticated requests are not decisions
    jwt_like = {"Authorization": "Bearer aaa.bbb.ccc"}
    status, answer = await post(client, body_for("app-2"), jwt_like)
    assert status == 401 and "OIDC" in answer["error"]["message"]
    assert log_state(client).sequencer.tree.size == 1

    records = (await audit(client))["records"]
    assert [r["decision"] for r in records] == ["allowed", "denied", "denied"]
    first, second, third = records
    assert first["rule"] == "ci-apps" and first["identity"]["subject"] == "ci"
    assert first["request"]["artifact"]["name"] == "app-1"
    assert first["request"]["key"] == "default"
    assert first["policy_sha256"] == leaf.policy.policy_sha256
    assert second["reasons"][0]["code"] == "no_rule" and second["rule"] is None
    assert third["identity"]["subject"] == "other"

    page = await audit(client, after=str(first["id"]), limit="1")
    assert [r["id"] for r in page["records"]] == [second["id"]]
    assert page["next"] == second["id"]
    only_denied = await audit(client, decision="denied")
    assert len(only_denied["records"]) == 2


async def test_the_audit_table_needs_the_admin_token(
    client: TestClient, tokens: Tokens
) -> None:
    for headers in ({}, tokens.header("ci"), token_header(client)):
        response = await client.get("/api/v1/audit", headers=headers)
        assert response.status == 401
    for params in ({"limit": "0"}, {"after": "-1"}, {"decision": "maybe"}):
        response = await client.get(
            "/api/v1/audit", params=params, headers=admin_header(client)
        )
        assert response.status == 400


async def test_rate_limit_per_identity(client: TestClient, tokens: Tokens) -> None:
    for i in range(3):
        await post(client, body_for(f"lib-{i}"), tokens.header("ci"), 201)
    response = await client.post(
        "/api/v1/entries", json=body_for("lib-3"), headers=tokens.header("ci")
    )
    assert response.status == 429
    assert int(response.headers["Retry-After"]) >= 1
    assert (await response.json())["error"]["code"] == "rate_limited"
    # Another identity has its own allowance (and is then denied by policy).
    await post(client, body_for("lib-3"), tokens.header("other"), 403)
    metrics = await (await client.get("/metrics")).text()
    assert "logserver_rate_limited_total 1.0" in metrics


async def test_batches_are_all_or_nothing(client: TestClient, tokens: Tokens) -> None:
    path = "/api/v1/entries/batch"
    ok = {"entries": [body_for("app-a"), body_for("lib-b")]}
    _, answer = await post(client, ok, tokens.header("ci"), 201, path)
    assert len(answer["entries"]) == 2

    mixed = {"entries": [body_for("app-c"), body_for("nope"), body_for("release-1")]}
    _, denied = await post(client, mixed, tokens.header("ci"), 403, path)
    details = denied["error"]["details"]
    assert [(d["entry"], d["code"]) for d in details] == [
        (1, "no_rule"),
        (2, "batch_not_supported"),
    ]
    assert log_state(client).sequencer.tree.size == 2
    records = (await audit(client, decision="denied"))["records"]
    assert sorted(r["reasons"][0]["code"] for r in records) == [
        "batch_denied",
        "batch_not_supported",
        "no_rule",
    ]


async def test_without_a_policy_the_bootstrap_token_signs(
    aiohttp_client: Any, tmp_path: Path, database_url: str, tokens: Tokens
) -> None:
    config = governed_config(tmp_path, database_url, None, tokens)
    client: TestClient = await aiohttp_client(create_app(config))
    _, answer = await post(client, body_for("x"), token_header(client), 201)
    leaf = parse_leaf(base64.b64decode(answer["leaf"]))
    assert leaf.policy.rule == "builtin-bootstrap-token"
    assert leaf.policy.request_id is None and leaf.policy.builders is None
    # Named tokens authenticate but no built-in rule lets them sign.
    await post(client, body_for("x"), tokens.header("ci"), 403)
    records = (await audit(client))["records"]
    assert [r["decision"] for r in records] == ["allowed", "denied"]


RELOADED = f"""
version = 1
[[rules]]
name = "ci-anything"
artifacts = "*"
keys = "default"
match = {{ issuer = "{TOKEN_ISSUER}", subject = "ci" }}
"""


async def test_sighup_reloads_the_policy_under_load(
    client: TestClient, tokens: Tokens, tmp_path: Path
) -> None:
    state = log_state(client)
    governance = state.governance
    governance.limiter = None  # this test is about reloads, not limits
    policy_path = tmp_path / "policy.toml"
    old_sha = governance.policy.sha256
    new_sha = hashlib.sha256(RELOADED.encode()).hexdigest()

    async def wait_for(predicate: Any) -> None:
        # The reload runs as a task on this loop: poll until it has landed.
        for _ in range(1000):
            if predicate():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("the reload did not happen in 10 s")

    async def submitter(worker: int) -> list[tuple[int, str | None]]:
        seen = []
        for i in range(25):
            status, answer = await post(
                client, body_for(f"app-{worker}-{i}"), tokens.header("ci")
            )
            sha = None
            if status == 201:
                sha = parse_leaf(base64.b64decode(answer["leaf"])).policy.policy_sha256
            seen.append((status, sha))
        return seen

    load = asyncio.gather(*(submitter(w) for w in range(8)))
    await asyncio.sleep(0.05)
    policy_path.write_text(RELOADED)
    os.kill(os.getpid(), signal.SIGHUP)
    await wait_for(lambda: governance.policy.sha256 == new_sha)
    results = [r for worker in await load for r in worker]
    # Not one request was dropped: every one was signed under one policy or the
    # other, and the rate limit of the old policy went with it.
    assert {status for status, _ in results} == {201}
    assert {sha for _, sha in results} <= {old_sha, new_sha}
    assert governance.limiter is None

    _, answer = await post(client, body_for("anything.bin"), tokens.header("ci"), 201)
    assert parse_leaf(base64.b64decode(answer["leaf"])).policy.policy_sha256 == new_sha

    # A broken file is refused and the policy in force stays.
    policy_path.write_text("version = 1\n[[rules]]\nname = 'half-written'\n")
    os.kill(os.getpid(), signal.SIGHUP)
    metrics = state.metrics
    await wait_for(
        lambda: (
            metrics.registry.get_sample_value(
                "logserver_policy_reloads_total", {"result": "failed"}
            )
            == 1
        )
    )
    assert governance.policy.sha256 == new_sha
    await post(client, body_for("still-fine.bin"), tokens.header("ci"), 201)


def test_sighup_reload_in_a_real_server(tmp_path: Path) -> None:
    policy = tmp_path / "policy.toml"
    policy.write_text(
        f"""
version = 1
[[rules]]
name = "bootstrap-apps"
artifacts = "app-*"
keys = "*"
match = {{ issuer = "{TOKEN_ISSUER}", subject = "bootstrap" }}
"""
    )
    server = ServerProcess(tmp_path / "data", "--policy", str(policy))
    try:
        assert server.post("api/v1/entries", body_for("app-1"))[0] == 201
        status, answer = server.post("api/v1/entries", body_for("tool"))
        assert status == 403 and answer["error"]["code"] == "denied"
        policy.write_text(RELOADED.replace('"ci"', '"bootstrap"'))
        server.proc.send_signal(signal.SIGHUP)
        for _ in range(100):
            status, _ = server.post("api/v1/entries", body_for("tool"))
            if status == 201:
                break
            time.sleep(0.05)
        assert status == 201
    finally:
        assert server.stop() == 0
    assert "policy in force" in server.log.read_text()


def test_new_tokens_never_look_like_an_option(tmp_path: Path) -> None:
    """`--token TOKEN` must work on any command line: no token starts with -."""
    # One token_urlsafe in 64 starts with "-": 2,000 would show it.
    tokens = [new_token_line(f"ci-{i}")[0] for i in range(1000)]
    tokens += [load_or_create_token(tmp_path / f"t{i}") for i in range(1000)]
    assert len(set(tokens)) == 2000
    assert not [t for t in tokens if t.startswith("-")]


def _disk_full(*args: object) -> NoReturn:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def test_token_files_are_written_whole_and_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "secrets" / "submit.token"
    modes: list[int] = []
    write = os.write

    def write_and_record_mode(fd: int, data: bytes) -> int:
        modes.append(stat.S_IMODE(os.fstat(fd).st_mode))
        return write(fd, data)

    monkeypatch.setattr(os, "write", write_and_record_mode)
    token = load_or_create_token(path)
    monkeypatch.undo()
    assert modes == [0o600]  # owner-only while being written, too
    assert path.read_text() == token + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert os.listdir(path.parent) == ["submit.token"]  # no temporary file left
    assert load_or_create_token(path) == token
    # A token file is created, never replaced (O_EXCL's guarantee).
    with pytest.raises(FileExistsError):
        _write_secret(path, "another\n")
    assert path.read_text() == token + "\n"
    assert os.listdir(path.parent) == ["submit.token"]


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_failed_token_write_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing: str
) -> None:
    """A full disk mid-write leaves nothing the next start would misread."""
    path = tmp_path / "secrets" / "admin.token"
    monkeypatch.setattr(os, failing, _disk_full)
    with pytest.raises(OSError, match=os.strerror(errno.ENOSPC)):
        load_or_create_token(path)
    monkeypatch.undo()
    assert os.listdir(path.parent) == []
    token = load_or_create_token(path)
    assert path.read_text() == token + "\n"
