"""CI OIDC tokens: our own issuer and JWKS on loopback, real PyJWT checks."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from logserver.app import create_app
from logserver.config import OidcConfig, OidcIssuerConfig
from logserver.errors import ApiError, Unauthorized, Unprocessable
from logserver.oidc import OidcVerifier, normalize_claims
from tests.govern import (
    AUDIENCE,
    GITHUB,
    Issuer,
    body_for,
    github_claims,
    governed_config,
    post,
)
from verifier.leaf import parse_leaf


class JwksServer:
    def __init__(self, issuer: Issuer) -> None:
        self.issuer = issuer
        self.fetches = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response(self.issuer.jwks())


@pytest.fixture
def issuer() -> Issuer:
    return Issuer()


@pytest.fixture
async def jwks(
    aiohttp_server: Any, issuer: Issuer
) -> AsyncIterator[tuple[JwksServer, str]]:
    served = JwksServer(issuer)
    app = web.Application()
    app.router.add_get("/.well-known/jwks", served.handle)
    server: TestServer = await aiohttp_server(app)
    yield served, str(server.make_url("/.well-known/jwks"))


@pytest.fixture
async def verifier(jwks: tuple[JwksServer, str]) -> AsyncIterator[OidcVerifier]:
    settings = OidcConfig(
        issuers=[
            OidcIssuerConfig(
                issuer=GITHUB, audience=AUDIENCE, provider="github", jwks_url=jwks[1]
            )
        ],
        jwks_refresh_seconds=0,
    )
    async with aiohttp.ClientSession() as session:
        yield OidcVerifier(settings, session)


async def test_a_valid_github_token_becomes_an_identity(
    verifier: OidcVerifier, issuer: Issuer
) -> None:
    token = issuer.token(**github_claims(repository_id=4711, ref_protected=True))
    identity = await verifier.authenticate(token)
    assert identity.issuer == GITHUB
    assert identity.subject == "repo:acme/app:ref:refs/heads/main"
    assert identity.claims["repository_id"] == "4711"
    assert identity.claims["ref_protected"] == "true"
    assert identity.claims["workflow_sha"] == "b" * 40
    assert "aud" not in identity.claims and "exp" not in identity.claims


async def expect_401(verifier: OidcVerifier, token: str, message: str) -> None:
    with pytest.raises(Unauthorized, match=message):
        await verifier.authenticate(token)


async def test_expired_and_not_yet_valid_tokens(
    verifier: OidcVerifier, issuer: Issuer
) -> None:
    now = int(time.time())
    await expect_401(verifier, issuer.token(lifetime=-120), "expired")
    # Within the 30 s leeway a token that just expired still counts.
    await verifier.authenticate(issuer.token(lifetime=-10))
    await expect_401(verifier, issuer.token(not_before=now + 600), "not valid yet")
    await expect_401(
        verifier, issuer.token(iat=now + 600, lifetime=900), "not valid yet"
    )


async def test_wrong_audience_and_unknown_issuer(
    verifier: OidcVerifier, issuer: Issuer
) -> None:
    await expect_401(verifier, issuer.token(audience="sigstore"), "audience")
    stranger = Issuer("https://gitlab.example.com")
    await expect_401(verifier, stranger.token(), "does not accept tokens from issuer")


async def test_forged_token_and_unknown_key(
    verifier: OidcVerifier, issuer: Issuer, jwks: tuple[JwksServer, str]
) -> None:
    served, _ = jwks
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    # Signed by another key under the published key ID.
    await expect_401(verifier, issuer.token(key=other), "signature does not verify")
    before = served.fetches
    # Signed by a key the issuer does not publish: fetched again, still unknown.
    await expect_401(verifier, issuer.token(key=other, kid="key-x"), "does not publish")
    assert served.fetches == before + 1
    # A token with its signature cut off, and one that is not a JWT at all.
    head, payload, _ = issuer.token().split(".")
    await expect_401(verifier, f"{head}.{payload}.", "signature")
    await expect_401(verifier, "a.b.c", "not a valid JWT")


async def test_algorithm_confusion_is_refused(
    verifier: OidcVerifier, issuer: Issuer
) -> None:
    # An HMAC token keyed with bytes of the published RSA key must not verify
    # as if the JWKS key were a shared secret, and `none` is never accepted.
    public_der = (
        issuer.keys[issuer.kid]
        .public_key()
        .public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    now = int(time.time())
    claims = {"iss": GITHUB, "aud": AUDIENCE, "sub": "x", "iat": now, "exp": now + 60}
    secret = hashlib.sha256(public_der).digest()
    forged = jwt.encode(claims, secret, algorithm="HS256", headers={"kid": "key-1"})
    await expect_401(verifier, forged, "algorithm")
    none_token = jwt.encode(claims, None, algorithm="none", headers={"kid": "key-1"})
    await expect_401(verifier, none_token, "algorithm")


async def test_keys_are_fetched_again_after_rotation(
    verifier: OidcVerifier, issuer: Issuer, jwks: tuple[JwksServer, str]
) -> None:
    served, _ = jwks
    await verifier.authenticate(issuer.token())
    await verifier.authenticate(issuer.token())
    assert served.fetches == 1  # cached
    issuer.rotate("key-2")
    identity = await verifier.authenticate(issuer.token())
    assert identity.issuer == GITHUB
    assert served.fetches == 2


async def test_malformed_claims_are_422(verifier: OidcVerifier, issuer: Issuer) -> None:
    with pytest.raises(Unprocessable, match="repository_id"):
        await verifier.authenticate(issuer.token(repository_id=["4711"]))
    with pytest.raises(Unprocessable, match="sub"):
        await verifier.authenticate(issuer.token(sub=""))


async def test_jwks_from_a_file_and_gitlab_claims(tmp_path: Path) -> None:
    gitlab = Issuer("https://gitlab.example.com")
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps(gitlab.jwks()))
    settings = OidcConfig(
        issuers=[
            OidcIssuerConfig(
                issuer=gitlab.issuer,
                audience=AUDIENCE,
                provider="gitlab",
                jwks_file=path,
            )
        ]
    )
    verifier = OidcVerifier(settings, None)
    token = gitlab.token(
        sub="project_path:acme/app:ref_type:tag:ref:v1.0",
        project_path="acme/app",
        project_id=99,
        namespace_path="acme",
        namespace_id=7,
        ref="v1.0",
        ref_type="tag",
        ref_protected="true",
        sha="c" * 40,
        ci_config_ref_uri="gitlab.example.com/acme/app//.gitlab-ci.yml@refs/tags/v1.0",
        ci_config_sha="d" * 40,
        runner_environment="gitlab-hosted",
        environment="production",
        pipeline_source="push",
        user_login="maintainer",
    )
    identity = await verifier.authenticate(token)
    assert identity.claims == {
        "repository": "acme/app",
        "repository_id": "99",
        "repository_owner": "acme",
        "repository_owner_id": "7",
        "ref": "refs/tags/v1.0",
        "ref_type": "tag",
        "ref_protected": "true",
        "sha": "c" * 40,
        "workflow_ref": "gitlab.example.com/acme/app//.gitlab-ci.yml@refs/tags/v1.0",
        "workflow_sha": "d" * 40,
        "runner_environment": "gitlab-hosted",
        "environment": "production",
        "event_name": "push",
        "actor": "maintainer",
    }
    with pytest.raises(ApiError):
        normalize_claims("gitlab", {"ref": "x", "ref_type": "weird"})


POLICY = f"""
version = 1
[[rules]]
name = "acme-app-main"
artifacts = "*"
keys = "default"
match = {{ issuer = "{GITHUB}", repository_id = "4711", ref = "refs/heads/main" }}
require = {{ claims = ["sha"], protected_ref = true }}
"""


@pytest.fixture
async def oidc_client(
    aiohttp_client: Any, tmp_path: Path, jwks: tuple[JwksServer, str]
) -> TestClient:
    config = governed_config(
        tmp_path,
        f"sqlite:///{tmp_path / 'log.db'}",
        POLICY,
        oidc={
            "issuers": [
                {
                    "issuer": GITHUB,
                    "audience": AUDIENCE,
                    "provider": "github",
                    "jwks_url": jwks[1],
                }
            ]
        },
    )
    client: TestClient = await aiohttp_client(create_app(config))
    return client


async def test_oidc_signing_records_identity_claims_and_rule(
    oidc_client: TestClient, issuer: Issuer, tmp_path: Path
) -> None:
    headers = {"Authorization": f"Bearer {issuer.token(**github_claims())}"}
    _, answer = await post(oidc_client, body_for("app.bin"), headers, 201)
    leaf = parse_leaf(base64.b64decode(answer["leaf"]))
    assert leaf.identity.issuer == GITHUB
    assert leaf.identity.claims["repository_id"] == "4711"
    assert leaf.identity.claims["sha"] == "a" * 40
    assert leaf.policy.rule == "acme-app-main"
    policy_bytes = (tmp_path / "policy.toml").read_bytes()
    assert leaf.policy.policy_sha256 == hashlib.sha256(policy_bytes).hexdigest()

    wrong = {"Authorization": f"Bearer {issuer.token(audience='other')}"}
    status, error = await post(oidc_client, body_for("x"), wrong)
    assert status == 401 and "audience" in error["error"]["message"]

    fork = {
        "Authorization": f"Bearer {issuer.token(**github_claims(repository_id='9'))}"
    }
    status, error = await post(oidc_client, body_for("y"), fork)
    assert status == 403
    assert error["error"]["code"] == "denied"
    assert error["error"]["details"][0]["code"] == "no_rule"

    malformed = {"Authorization": f"Bearer {issuer.token(**github_claims(ref=['x']))}"}
    status, error = await post(oidc_client, body_for("z"), malformed)
    assert status == 422
