"""CI OIDC ID tokens (GitHub Actions, GitLab CI) as identities.

Verification is PyJWT's; this module only chooses the key and the checks:

1. The token's `iss` (read before verification only to pick the issuer's
   configuration) must be a configured issuer.
2. The key is the issuer's JWKS entry with the token's `kid`. The JWKS comes
   from a file or a URL, is cached, and is fetched again when a token names
   a key ID it does not hold (at most once per `jwks_refresh_seconds`).
3. PyJWT checks the signature with that key's own algorithm (never `none`
   or a shared secret), `iss`, the required `aud`, `exp` and, if present,
   `nbf` and `iat`, with a small leeway; `exp`, `iat`, `iss`, `aud` and
   `sub` must be present.
4. The provider's claims are mapped onto the policy's claim names
   (`logserver.policy.IDENTITY_CLAIMS`). A claim of the wrong type is a
   malformed request (422), not an authentication failure.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import orjson

from logserver.auth import Identity
from logserver.config import OidcConfig, OidcIssuerConfig
from logserver.errors import Unauthorized, Unavailable, Unprocessable
from logserver.policy import IDENTITY_CLAIMS

logger = logging.getLogger(__name__)

MAX_JWKS_BYTES = 1 << 20

# Provider claim -> policy claim. GitHub's names are the policy's own.
_GITHUB = {name: name for name in IDENTITY_CLAIMS if name not in ("issuer", "subject")}
_GITLAB = {
    "project_path": "repository",
    "project_id": "repository_id",
    "namespace_path": "repository_owner",
    "namespace_id": "repository_owner_id",
    "ref_path": "ref",
    "ref_type": "ref_type",
    "ref_protected": "ref_protected",
    "sha": "sha",
    "ci_config_ref_uri": "workflow_ref",
    "ci_config_sha": "workflow_sha",
    "runner_environment": "runner_environment",
    "environment": "environment",
    "pipeline_source": "event_name",
    "user_login": "actor",
}
_MAPPINGS: dict[str, Mapping[str, str]] = {
    "github": _GITHUB,
    "gitlab": _GITLAB,
    "generic": _GITHUB,
}


def _claim_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int):
        return str(value)
    raise Unprocessable(
        f"the token's {name!r} claim is a {type(value).__name__}; expected a "
        "string, integer or boolean"
    )


def normalize_claims(provider: str, payload: Mapping[str, Any]) -> dict[str, str]:
    """The token's claims under the policy's names, as strings."""
    claims: dict[str, str] = {}
    for source, target in _MAPPINGS[provider].items():
        value = payload.get(source)
        if value is not None:
            claims[target] = _claim_text(source, value)
    if provider == "gitlab" and "ref" not in claims and "ref" in payload:
        # Older GitLab tokens have no ref_path: rebuild it from ref and ref_type.
        ref = _claim_text("ref", payload["ref"])
        kind = {"branch": "heads", "tag": "tags"}.get(claims.get("ref_type", ""))
        if kind is None:
            raise Unprocessable("the token's ref_type must be 'branch' or 'tag'")
        claims["ref"] = f"refs/{kind}/{ref}"
    return claims


class JwksCache:
    """One issuer's signing keys, by key ID, fetched when needed."""

    def __init__(
        self,
        issuer: OidcIssuerConfig,
        settings: OidcConfig,
        session: aiohttp.ClientSession | None,
    ) -> None:
        self.issuer = issuer
        self._settings = settings
        self._session = session
        self._keys: dict[str | None, jwt.PyJWK] = {}
        self._fetched: float | None = None
        self._lock = asyncio.Lock()

    async def key(self, kid: str | None) -> jwt.PyJWK:
        now = time.monotonic()
        if (
            self._fetched is None
            or now - self._fetched >= self._settings.jwks_cache_seconds
        ):
            await self._refresh(self._fetched)
        found = self._find(kid)
        fetched = self._fetched
        if (
            found is None
            and fetched is not None
            and time.monotonic() - fetched >= self._settings.jwks_refresh_seconds
        ):
            # An unknown key ID: the issuer may have rotated its keys.
            await self._refresh(fetched)
            found = self._find(kid)
        if found is None:
            raise Unauthorized(
                f"the token is signed with key ID {kid!r}, which issuer "
                f"{self.issuer.issuer} does not publish"
            )
        return found

    def _find(self, kid: str | None) -> jwt.PyJWK | None:
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid)

    async def _refresh(self, seen: float | None) -> None:
        async with self._lock:
            if self._fetched != seen:
                return  # another request refreshed while this one waited
            try:
                document = await self._fetch()
                keys = _parse_jwks(document)
            except (OSError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                logger.warning(
                    "cannot fetch the issuer's JWKS",
                    extra={"issuer": self.issuer.issuer, "error": str(exc)},
                )
                if not self._keys:
                    raise Unavailable(
                        f"cannot fetch the signing keys of {self.issuer.issuer}; "
                        "retry shortly",
                        retry_after=5,
                    ) from exc
                # Keep the keys we have; try again after the refresh interval.
                self._fetched = time.monotonic()
                return
            self._keys = keys
            self._fetched = time.monotonic()
            logger.info(
                "loaded JWKS",
                extra={"issuer": self.issuer.issuer, "keys": len(keys)},
            )

    async def _fetch(self) -> bytes:
        if self.issuer.jwks_file is not None:
            path: Path = self.issuer.jwks_file
            return await asyncio.to_thread(path.read_bytes)
        assert self.issuer.jwks_url is not None
        if self._session is None:
            raise ValueError("no HTTP session to fetch the JWKS with")
        timeout = aiohttp.ClientTimeout(total=self._settings.fetch_timeout_seconds)
        body = bytearray()
        async with self._session.get(self.issuer.jwks_url, timeout=timeout) as answer:
            answer.raise_for_status()
            async for chunk in answer.content.iter_chunked(1 << 16):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise ValueError("the JWKS is larger than 1 MiB")
        return bytes(body)


def _parse_jwks(document: bytes) -> dict[str | None, jwt.PyJWK]:
    try:
        data = orjson.loads(document)
        if not isinstance(data, dict) or not isinstance(data.get("keys", []), list):
            raise ValueError("a JWKS is a JSON object with a list of keys")
        # Shared-secret keys can never verify a CI token.
        data["keys"] = [
            k
            for k in data.get("keys", [])
            if isinstance(k, dict) and k.get("kty") != "oct"
        ]
        keys = jwt.PyJWKSet.from_dict(data).keys
    except (orjson.JSONDecodeError, jwt.PyJWTError) as exc:
        raise ValueError(f"not a usable JWKS: {exc}") from exc
    return {key.key_id: key for key in keys}


_REASONS: tuple[tuple[type[jwt.PyJWTError], str], ...] = (
    (jwt.ExpiredSignatureError, "the token has expired"),
    (jwt.ImmatureSignatureError, "the token is not valid yet (nbf or iat)"),
    (jwt.InvalidAudienceError, "the token is not for this log's audience"),
    (jwt.InvalidIssuerError, "the token's issuer does not match"),
    (jwt.InvalidSignatureError, "the token's signature does not verify"),
    (jwt.InvalidAlgorithmError, "the token's algorithm does not match its key"),
    (jwt.MissingRequiredClaimError, "the token lacks a required claim"),
)


class OidcVerifier:
    """Verifies ID tokens from the configured issuers."""

    def __init__(
        self, settings: OidcConfig, session: aiohttp.ClientSession | None
    ) -> None:
        self.settings = settings
        self._caches = {
            issuer.issuer: JwksCache(issuer, settings, session)
            for issuer in settings.issuers
        }

    async def authenticate(self, token: str) -> Identity:
        # 1.
        try:
            header = jwt.get_unverified_header(token)
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as exc:
            raise Unauthorized(f"the bearer token is not a valid JWT: {exc}") from exc
        issuer = unverified.get("iss")
        cache = self._caches.get(issuer) if isinstance(issuer, str) else None
        if cache is None:
            raise Unauthorized(
                f"this log does not accept tokens from issuer {issuer!r}"
            )
        config = cache.issuer
        # 2.
        kid = header.get("kid")
        key = await cache.key(kid if isinstance(kid, str) else None)
        # 3.
        try:
            payload = jwt.decode(
                token,
                key,
                algorithms=[key.algorithm_name],
                audience=config.audience,
                issuer=config.issuer,
                leeway=self.settings.leeway_seconds,
                options={"require": ["exp", "iat", "iss", "aud", "sub"]},
            )
        except jwt.PyJWTError as exc:
            for kind, reason in _REASONS:
                if isinstance(exc, kind):
                    raise Unauthorized(f"{reason}: {exc}") from exc
            raise Unauthorized(f"the token is not valid: {exc}") from exc
        # 4.
        subject = payload["sub"]
        if not isinstance(subject, str) or not subject:
            raise Unprocessable("the token's 'sub' claim must be a non-empty string")
        claims = normalize_claims(config.provider, payload)
        return Identity(config.issuer, subject, claims)
