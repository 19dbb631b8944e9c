"""The policy language: parsing, the allow/deny matrix, lint, and the CLI."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from logserver.auth import (
    TOKEN_ISSUER,
    Identity,
    TokensFileError,
    parse_tokens_file,
    token_hash,
)
from logserver.cli import main
from logserver.errors import TooManyRequests
from logserver.models import SubmitRequest
from logserver.policy import PolicyError, builtin_policy, evaluate, parse_policy
from logserver.ratelimit import RateLimiter
from tests.govern import GITHUB, approvers_toml, digest_of, make_approvers

POLICY = f"""
version = 1
protected_refs = ["refs/heads/main", "refs/tags/v*"]

[rate_limit]
requests_per_minute = 60
burst = 5

{approvers_toml(make_approvers())}

[[rules]]
name = "release"
mode = "ceremonial"
artifacts = "app-*.tar.gz"
keys = ["release"]
match = {{ issuer = "{GITHUB}", repository_id = "4711", ref = "refs/tags/v*" }}
require = {{ claims = ["sha", "source.commit"], protected_ref = true }}
ceremony = {{ approvers = ["alice", "bob", "carol"], threshold = 2 }}

[[rules]]
name = "reproducible"
artifacts = ["lib-*.so"]
keys = "default"
match = {{ issuer = "{TOKEN_ISSUER}", subject = "builder-*" }}
quorum = {{ builders = 3, window_seconds = 600 }}

[[rules]]
name = "ci-main"
artifacts = ["*"]
keys = ["default"]
[rules.match]
issuer = "{GITHUB}"
repository_id = "4711"
ref = ["refs/heads/main", "refs/heads/release/*"]
workflow_ref = "acme/app/.github/workflows/*@refs/heads/*"
runner_environment = "github-hosted"
[rules.require]
claims = ["sha", "workflow_sha"]
protected_ref = true

[[rules]]
name = "nightly-token"
artifacts = ["nightly-*"]
keys = ["default"]
match = {{ issuer = "{TOKEN_ISSUER}", subject = "nightly" }}
require = {{ claims = ["build.builder"] }}
"""


def gh(**claims: str) -> Identity:
    base = {
        "repository": "acme/app",
        "repository_id": "4711",
        "ref": "refs/heads/main",
        "ref_protected": "true",
        "sha": "a" * 40,
        "workflow_ref": "acme/app/.github/workflows/ci.yml@refs/heads/main",
        "workflow_sha": "b" * 40,
        "runner_environment": "github-hosted",
    }
    base.update(claims)
    return Identity(GITHUB, "repo:acme/app:ref:refs/heads/main", base)


def token(name: str) -> Identity:
    return Identity(TOKEN_ISSUER, name)


def req(name: str, **extra: Any) -> SubmitRequest:
    return SubmitRequest.model_validate(
        {"artifact": {"name": name, "sha256": digest_of(name)}, **extra}
    )


COMMIT = {"source": {"commit": "c" * 40}}

# (identity, artifact, request members, key, allowed, rule, reason code)
MATRIX: list[tuple[str, Identity, str, dict[str, Any], str, bool, str | None, str]] = [
    ("automated on main", gh(), "app.bin", {}, "default", True, "ci-main", ""),
    ("release branch glob", gh(ref="refs/heads/release/2"), "x", {}, "default", True,
     "ci-main", ""),
    ("other repository id", gh(repository_id="1"), "x", {}, "default", False, None,
     "no_rule"),
    ("renamed repo, same id", gh(repository="evil/app"), "x", {}, "default", True,
     "ci-main", ""),
    ("self-hosted runner", gh(runner_environment="self-hosted"), "x", {}, "default",
     False, None, "no_rule"),
    ("feature branch", gh(ref="refs/heads/feature"), "x", {}, "default", False, None,
     "no_rule"),
    ("key not allowed", gh(), "app.bin", {}, "release", False, None, "no_rule"),
    ("missing workflow digest", gh(workflow_sha=""), "x", {}, "default", False,
     "ci-main", "claim_missing"),
    ("unprotected ref, protected_refs list", gh(ref_protected="false"), "x", {},
     "default", True, "ci-main", ""),
    ("unprotected release branch", gh(ref="refs/heads/release/2",
     ref_protected="false"), "x", {}, "default", False, "ci-main", "ref_not_protected"),
    ("release tag, ceremonial", gh(ref="refs/tags/v1.0"), "app-1.0.tar.gz", COMMIT,
     "release", True, "release", ""),
    ("release tag without commit", gh(ref="refs/tags/v1.0"), "app-1.0.tar.gz", {},
     "release", False, "release", "claim_missing"),
    ("quorum builder", token("builder-1"), "lib-a.so", COMMIT, "default", True,
     "reproducible", ""),
    ("quorum without commit", token("builder-1"), "lib-a.so", {}, "default", False,
     "reproducible", "claim_missing"),
    ("token needs builder", token("nightly"), "nightly-1", {}, "default", False,
     "nightly-token", "claim_missing"),
    ("token with builder", token("nightly"), "nightly-1",
     {"build": {"builder": "b1"}}, "default", True, "nightly-token", ""),
    ("token wrong artifact", token("nightly"), "app.bin", {}, "default", False, None,
     "no_rule"),
    ("bootstrap has no rule", token("bootstrap"), "x", {}, "default", False, None,
     "no_rule"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "identity", "artifact", "extra", "key", "allowed", "rule", "code"),
    MATRIX,
    ids=[m[0] for m in MATRIX],
)
def test_allow_deny_matrix(
    case: str,
    identity: Identity,
    artifact: str,
    extra: dict[str, Any],
    key: str,
    allowed: bool,
    rule: str | None,
    code: str,
) -> None:
    policy = parse_policy(POLICY.encode())
    result = evaluate(policy, identity, req(artifact, **extra), key)
    assert result.allowed is allowed, result.explain()
    assert result.rule_name == rule
    if not allowed:
        assert result.reasons[0].code == code
    assert result.policy_sha256 == policy.sha256


def test_first_applicable_rule_decides_and_later_rules_are_not_consulted() -> None:
    text = f"""
version = 1
[[rules]]
name = "strict"
artifacts = "*"
keys = "*"
match = {{ issuer = "{TOKEN_ISSUER}", subject = "ci" }}
require = {{ claims = ["source.commit"] }}
[[rules]]
name = "lax"
artifacts = "*"
keys = "*"
match = {{ issuer = "{TOKEN_ISSUER}" }}
"""
    policy = parse_policy(text.encode())
    denied = evaluate(policy, token("ci"), req("a"), "default")
    assert not denied.allowed and denied.rule_name == "strict"
    other = evaluate(policy, token("other"), req("a"), "default")
    assert other.allowed and other.rule_name == "lax"
    assert other.skipped == (("strict", "subject 'other' matches none of 'ci'"),)
    assert any("denied by rule 'strict'" in line for line in denied.explain())


def test_builtin_policy_allows_only_the_bootstrap_token() -> None:
    policy = builtin_policy()
    assert policy.sha256 == (
        "dc6b0f1d8a16242786bfd455df74828ead7fbb907cca1284dc5b7eaf9c354206"
    )
    assert evaluate(policy, token("bootstrap"), req("a"), "any").allowed
    assert not evaluate(policy, token("someone"), req("a"), "any").allowed


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version = 1\nrules = [", "not valid TOML"),
        ("version = 2\n[[rules]]\nname='a'\nartifacts='*'\nkeys='*'", "version"),
        ("version = 1\n", "rules"),
        ("version = 1\n[[rules]]\nname='a'\nartifacts='*'\nkeys='*'\nextra=1", "extra"),
        (
            "version = 1\n[[rules]]\nname='a'\nartifacts='*'\nkeys='*'\n"
            "match={colour='red'}",
            "cannot match on 'colour'",
        ),
        (
            "version = 1\n[[rules]]\nname='a'\nartifacts='*'\nkeys='*'\n"
            "require={claims=['nonsense']}",
            "unknown claim 'nonsense'",
        ),
        (
            "version = 1\n[[rules]]\nname='a'\nartifacts='*'\nkeys='*'\n"
            "[[rules]]\nname='a'\nartifacts='*'\nkeys='*'",
            "unique",
        ),
        (
            "version = 1\n[[rules]]\nname='a'\nmode='ceremonial'\nartifacts='*'\n"
            "keys='*'",
            "needs a [rules.ceremony]",
        ),
        (
            "version = 1\n[[rules]]\nname='a'\nmode='ceremonial'\nartifacts='*'\n"
            "keys='*'\nceremony={approvers=['nobody'], threshold=1}",
            "unknown approvers nobody",
        ),
        (
            "version = 1\n[approvers.x]\npublic_key='junk'\n"
            "[[rules]]\nname='a'\nartifacts='*'\nkeys='*'",
            "not a PEM public key",
        ),
        (
            "version = 1\n[[rules]]\nname='a'\nartifacts='*'\nkeys='*'\n"
            "quorum={builders=1}",
            "builders",
        ),
    ],
)
def test_broken_policies_are_refused_with_the_reason(text: str, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("[", r"\[")):
        parse_policy(text.encode(), "p.toml")


def test_threshold_above_approver_count_is_refused() -> None:
    text = (
        "version = 1\n"
        + approvers_toml(make_approvers())
        + "[[rules]]\nname='a'\nmode='ceremonial'\nartifacts='*'\nkeys='*'\n"
        "ceremony={approvers=['alice','bob'], threshold=3}\n"
    )
    with pytest.raises(PolicyError, match="threshold 3 is more than the 2"):
        parse_policy(text.encode())


def test_lint_warnings() -> None:
    text = """
version = 1
[[rules]]
name = "by-name"
artifacts = "*"
keys = "*"
match = { repository = "acme/app" }
[[rules]]
name = "everything"
artifacts = "*"
keys = "*"
[[rules]]
name = "unreachable"
artifacts = "*"
keys = "*"
"""
    warnings = parse_policy(text.encode()).warnings
    assert any("pin repository_id" in w for w in warnings)
    assert any("claims of any issuer" in w for w in warnings)
    assert any("'unreachable') are never reached" in w for w in warnings)


def test_tokens_file() -> None:
    good = f"# comment\n\nci sha256:{token_hash('x')}\n"
    assert parse_tokens_file(good, "t") == [("ci", bytes.fromhex(token_hash("x")))]
    for bad, message in [
        ("ci x", "expected 'NAME sha256"),
        (f"bootstrap sha256:{'0' * 64}", "not a token name"),
        (f"a sha256:{'0' * 64}\na sha256:{'1' * 64}", "listed twice"),
    ]:
        with pytest.raises(TokensFileError, match=message):
            parse_tokens_file(bad, "t")


def test_rate_limiter() -> None:
    now = [100.0]
    limiter = RateLimiter(per_second=0.5, burst=2, clock=lambda: now[0])
    limiter.check(("i", "a"))
    limiter.check(("i", "a"))
    with pytest.raises(TooManyRequests) as caught:
        limiter.check(("i", "a"))
    assert caught.value.retry_after == 2
    limiter.check(("i", "b"))  # another identity has its own bucket
    now[0] += 2
    limiter.check(("i", "a"))


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "policy.toml"
    path.write_text(text)
    return path


def test_policy_check_explains(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, POLICY)
    assert main(["policy", "check", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid policy, 4 rules" in out

    allowed = [
        "policy", "check", str(path), "--issuer", GITHUB, "--subject", "repo:x",
        "--claim", "repository_id=4711", "--claim", "ref=refs/heads/main",
        "--claim", "workflow_ref=acme/app/.github/workflows/ci.yml@refs/heads/main",
        "--claim", "runner_environment=github-hosted", "--claim", "sha=abc",
        "--claim", "workflow_sha=def", "--artifact", "app.bin",
    ]  # fmt: skip
    assert main(allowed) == 0
    out = capsys.readouterr().out
    assert "rule 'release' does not apply" in out
    assert "allowed by rule 'ci-main' (automated)" in out

    denied = [
        "policy", "check", str(path), "--subject", "nightly", "--artifact",
        "nightly-7", "--json",
    ]  # fmt: skip
    assert main(denied) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["decision"]["allowed"] is False
    assert report["decision"]["rule"] == "nightly-token"
    assert report["decision"]["reasons"][0]["code"] == "claim_missing"

    ceremonial = [
        "policy", "check", str(path), "--issuer", GITHUB, "--subject", "s",
        "--claim", "repository_id=4711", "--claim", "ref=refs/tags/v2",
        "--claim", "sha=abc", "--artifact", "app-2.tar.gz", "--key", "release",
        "--commit", "c0ffee",
    ]  # fmt: skip
    assert main(ceremonial) == 0
    assert "after 2 of 3 approvers approve" in capsys.readouterr().out


def test_policy_check_refuses_a_broken_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "version = 1\n[[rules]]\nname = 'x'\n")
    assert main(["policy", "check", str(path)]) == 1
    err = capsys.readouterr().err
    assert "rules.0.artifacts" in err and "rules.0.keys" in err


def test_policy_check_with_config_flags_unknown_keys(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, POLICY)
    config = tmp_path / "server.toml"
    config.write_text("")
    assert main(["policy", "check", str(path), "--config", str(config)]) == 0
    assert "names key 'release', which" in capsys.readouterr().out


def test_token_create(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tokens = tmp_path / "tokens"
    assert main(["token", "create", "ci-nightly", "--append", str(tokens)]) == 0
    captured = capsys.readouterr()
    token = captured.out.strip()
    assert token and token not in tokens.read_text()
    entries = parse_tokens_file(tokens.read_text(), str(tokens))
    assert entries == [("ci-nightly", bytes.fromhex(token_hash(token)))]
    assert tokens.stat().st_mode & 0o777 == 0o600
    assert "SIGHUP" in captured.err
    assert main(["token", "create", "bad name"]) == 2


def test_token_create_appends_after_a_last_line_without_newline(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tokens = tmp_path / "tokens"
    first = "deploy sha256:" + "ab" * 32
    tokens.write_text(first)  # edited by hand, no final newline
    assert main(["token", "create", "ci-nightly", "--append", str(tokens)]) == 0
    token = capsys.readouterr().out.strip()
    entries = parse_tokens_file(tokens.read_text(), str(tokens))
    assert entries == [
        ("deploy", bytes.fromhex("ab" * 32)),
        ("ci-nightly", bytes.fromhex(token_hash(token))),
    ]
    assert tokens.read_text().endswith("\n")


ROOT = Path(__file__).resolve().parent.parent


def toml_blocks(path: Path) -> list[str]:
    import re

    return re.findall(r"```toml\n(.*?)```", path.read_text(), re.S)


def test_the_documented_policies_are_valid() -> None:
    spec = [b for b in toml_blocks(ROOT / "SPEC.md") if "[[rules]]" in b]
    readme = [b for b in toml_blocks(ROOT / "README.md") if "[[rules]]" in b]
    assert spec and readme
    for block in spec + readme:
        policy = parse_policy(block.encode())
        assert not policy.warnings, policy.warnings


def test_serve_refuses_a_broken_policy(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write(tmp_path, "version = 1\n")
    code = main(["serve", "--data", str(tmp_path / "data"), "--policy", str(path)])
    assert code == 2
    assert "rules: Field required" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()
