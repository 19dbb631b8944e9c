"""Who is asking: bearer tokens for the write API.

Tokens are kept only as SHA-256 hashes and compared in constant time. For now
one bootstrap token, generated at first start, maps to one identity.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from logserver.errors import Unauthorized

TOKEN_ISSUER = "logserver/token"  # noqa: S105 (an issuer name, not a secret)


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller, as recorded in the leaf."""

    issuer: str
    subject: str
    claims: dict[str, str] = field(default_factory=dict)


def load_or_create_token(path: Path) -> str:
    """The bootstrap submit token, created with owner-only permissions if absent."""
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


class TokenAuthenticator:
    """Maps bearer tokens, known only by their hashes, to identities."""

    def __init__(self) -> None:
        self._identities: list[tuple[bytes, Identity]] = []

    def add_token(self, token: str, subject: str) -> None:
        digest = hashlib.sha256(token.encode()).digest()
        self._identities.append((digest, Identity(TOKEN_ISSUER, subject)))

    def authenticate(self, authorization: str | None) -> Identity:
        if authorization is None:
            raise Unauthorized("missing Authorization: Bearer <token> header")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be 'Bearer <token>'")
        presented = hashlib.sha256(token.strip().encode()).digest()
        found: Identity | None = None
        # Compare against every token so the time taken says nothing about which.
        for digest, identity in self._identities:
            if hmac.compare_digest(presented, digest):
                found = identity
        if found is None:
            raise Unauthorized("the bearer token is not valid for this log")
        return found
