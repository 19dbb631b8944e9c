"""Helpers for the governance tests: policies, tokens, approvers, OIDC issuers."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
from aiohttp.test_utils import TestClient
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes

from logserver.auth import new_token_line
from logserver.config import Config, load_config
from tests.conftest import ORIGIN

GITHUB = "https://token.actions.githubusercontent.com"
AUDIENCE = "logsign"


def digest_of(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def body_for(name: str, *, digest: str | None = None, **extra: Any) -> dict[str, Any]:
    return {"artifact": {"name": name, "sha256": digest or digest_of(name)}, **extra}


def public_pem(key: PrivateKeyTypes) -> str:
    return (
        key.public_key()
        .public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo,
        )
        .decode()
    )


def private_pem(key: PrivateKeyTypes) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def approvers_toml(keys: dict[str, PrivateKeyTypes]) -> str:
    return "".join(
        f'[approvers.{name}]\npublic_key = """{public_pem(key)}"""\n\n'
        for name, key in keys.items()
    )


def make_approvers() -> dict[str, PrivateKeyTypes]:
    """Three approvers: two Ed25519 keys and one ECDSA P-256 key."""
    return {
        "alice": ed25519.Ed25519PrivateKey.generate(),
        "bob": ec.generate_private_key(ec.SECP256R1()),
        "carol": ed25519.Ed25519PrivateKey.generate(),
    }


@dataclass
class Tokens:
    """Named bearer tokens and the tokens file that admits them."""

    path: Path
    tokens: dict[str, str] = field(default_factory=dict)

    @classmethod
    def create(cls, path: Path, *names: str) -> Tokens:
        made = cls(path)
        lines = []
        for name in names:
            token, line = new_token_line(name)
            made.tokens[name] = token
            lines.append(line)
        path.write_text("# test tokens\n" + "\n".join(lines) + "\n")
        return made

    def header(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[name]}"}


def governed_config(
    tmp_path: Path,
    database_url: str,
    policy: str | None,
    tokens: Tokens | None = None,
    **extra: Any,
) -> Config:
    policy_path = None
    if policy is not None:
        policy_path = tmp_path / "policy.toml"
        policy_path.write_text(policy)
    return load_config(
        None,
        data=tmp_path / "data",
        database=database_url,
        origin=ORIGIN,
        sequencer={"linger_ms": 0},
        policy=policy_path,
        tokens=None if tokens is None else tokens.path,
        **extra,
    )


async def post(
    client: TestClient,
    body: dict[str, Any],
    headers: dict[str, str],
    status: int | None = None,
    path: str = "/api/v1/entries",
) -> tuple[int, Any]:
    response = await client.post(path, json=body, headers=headers)
    answer = await response.json()
    if status is not None:
        assert response.status == status, answer
    return response.status, answer


def admin_header(client: TestClient) -> dict[str, str]:
    from tests.conftest import log_state

    token = log_state(client).admin_token_path.read_text().strip()
    return {"Authorization": f"Bearer {token}"}


class Issuer:
    """A CI OIDC issuer of our own: keys, a JWKS, and tokens it signs."""

    def __init__(self, issuer: str = GITHUB, kid: str = "key-1") -> None:
        self.issuer = issuer
        self.keys: dict[str, rsa.RSAPrivateKey] = {}
        self.rotate(kid)

    def rotate(self, kid: str) -> None:
        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.kid = kid

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": keys}

    def token(
        self,
        *,
        key: rsa.RSAPrivateKey | None = None,
        kid: str | None = None,
        audience: str = AUDIENCE,
        lifetime: int = 300,
        not_before: int | None = None,
        **claims: Any,
    ) -> str:
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.issuer,
            "aud": audience,
            "sub": "repo:acme/app:ref:refs/heads/main",
            "iat": now,
            "exp": now + lifetime,
            **claims,
        }
        if not_before is not None:
            payload["nbf"] = not_before
        signing_key = key if key is not None else self.keys[self.kid]
        return jwt.encode(
            payload,
            signing_key,
            algorithm="RS256",
            headers={"kid": kid or self.kid},
        )


def github_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "repository": "acme/app",
        "repository_id": "4711",
        "repository_owner": "acme",
        "repository_owner_id": "42",
        "ref": "refs/heads/main",
        "ref_type": "branch",
        "ref_protected": "true",
        "sha": "a" * 40,
        "workflow_ref": "acme/app/.github/workflows/release.yml@refs/heads/main",
        "workflow_sha": "b" * 40,
        "runner_environment": "github-hosted",
        "event_name": "push",
        "actor": "octocat",
    }
    claims.update(overrides)
    return claims
