"""Who is asking: bearer tokens and CI OIDC tokens for the write API.

Bearer tokens are kept only as SHA-256 hashes and compared in constant time.
The bootstrap token (DATA/secrets/submit.token) is the identity `bootstrap`;
a tokens file adds named identities, one line each:

    # NAME sha256:HEX
    nightly-ci sha256:3b1f...

`logserver token create NAME` prints a new token and its line. A bearer
value with two dots is a JWT and goes to the OIDC verifier instead.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from logserver.errors import Unauthorized
from signer.atomicfile import write_atomic

if TYPE_CHECKING:
    from logserver.oidc import OidcVerifier

TOKEN_ISSUER = "logserver/token"  # noqa: S105 (an issuer name, not a secret)
BOOTSTRAP_SUBJECT = "bootstrap"
ADMIN_SUBJECT = "admin"

_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,127}")
_TOKEN_LINE = re.compile(r"(?P<name>\S+)\s+sha256:(?P<hash>[0-9a-f]{64})")
# RFC 6750 section 2.1: what a bearer token may be made of. Our tokens and
# JWTs both fit; anything else (non-ASCII, control characters, the bytes
# a client sent that were not UTF-8) cannot be a token of this log.
_B64TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller, as recorded in the leaf."""

    issuer: str
    subject: str
    claims: dict[str, str] = field(default_factory=dict)


class TokensFileError(Exception):
    """The tokens file cannot be used; the message says which line and why."""


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _write_secret(path: Path, text: str) -> None:
    """Create `path` (0600, all at once); FileExistsError if it exists."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_atomic(path, text.encode(), mode=0o600, exclusive=True)


def new_token() -> str:
    """A random bearer token that does not start with "-".

    One token in 64 would otherwise, and `--token -x...` on a command line
    reads as an option.
    """
    while True:
        token = secrets.token_urlsafe(32)
        if not token.startswith("-"):
            return token


def load_or_create_token(path: Path) -> str:
    """A secret token file, created with owner-only permissions if absent."""
    if path.exists():
        return path.read_text().strip()
    token = new_token()
    _write_secret(path, token + "\n")
    return token


def new_token_line(name: str) -> tuple[str, str]:
    """A fresh token and the tokens-file line that admits it as `name`."""
    if not _TOKEN_NAME.fullmatch(name) or name == BOOTSTRAP_SUBJECT:
        raise ValueError(
            f"token name {name!r} must be 1 to 128 of A-Z a-z 0-9 . _ @ - "
            f"(not starting with punctuation) and not {BOOTSTRAP_SUBJECT!r}"
        )
    token = new_token()
    return token, f"{name} sha256:{token_hash(token)}"


def parse_tokens_file(text: str, source: str) -> list[tuple[str, bytes]]:
    """(name, SHA-256 of the token) for every line of a tokens file."""
    entries: list[tuple[str, bytes]] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        found = _TOKEN_LINE.fullmatch(line)
        if found is None:
            raise TokensFileError(
                f"{source}:{number}: expected 'NAME sha256:<64 hex digits>' "
                "(make lines with `logserver token create NAME`)"
            )
        name = found["name"]
        if not _TOKEN_NAME.fullmatch(name) or name == BOOTSTRAP_SUBJECT:
            raise TokensFileError(f"{source}:{number}: {name!r} is not a token name")
        if any(name == other for other, _ in entries):
            raise TokensFileError(f"{source}:{number}: {name!r} is listed twice")
        entries.append((name, bytes.fromhex(found["hash"])))
    return entries


def load_tokens_file(path: Path) -> list[tuple[str, bytes]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise TokensFileError(f"cannot read tokens file {path}: {exc}") from exc
    return parse_tokens_file(text, str(path))


def bearer_value(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer <token>` header."""
    if authorization is None:
        raise Unauthorized("missing Authorization: Bearer <token> header")
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("the Authorization header must be 'Bearer <token>'")
    token = token.strip()
    if not _B64TOKEN.fullmatch(token):
        raise Unauthorized("the bearer token is not valid for this log")
    return token


class TokenAuthenticator:
    """Maps bearer tokens, known only by their hashes, to identities."""

    def __init__(self) -> None:
        self._identities: list[tuple[bytes, Identity]] = []

    def add_token(self, token: str, subject: str) -> None:
        self.add_hash(hashlib.sha256(token.encode()).digest(), subject)

    def add_hash(self, digest: bytes, subject: str) -> None:
        self._identities.append((digest, Identity(TOKEN_ISSUER, subject)))

    def add_hashes(self, entries: Iterable[tuple[str, bytes]]) -> None:
        for subject, digest in entries:
            self.add_hash(digest, subject)

    def lookup(self, token: str) -> Identity | None:
        presented = hashlib.sha256(token.encode()).digest()
        found: Identity | None = None
        # Compare against every token so the time taken says nothing about which.
        for digest, identity in self._identities:
            if hmac.compare_digest(presented, digest):
                found = identity
        return found

    def authenticate(self, authorization: str | None) -> Identity:
        found = self.lookup(bearer_value(authorization))
        if found is None:
            raise Unauthorized("the bearer token is not valid for this log")
        return found


class Authenticator:
    """Bearer tokens first; a JWT goes to the OIDC verifier, if configured.

    `tokens` is replaced whole on reload (SIGHUP), so a request sees either
    the old set or the new one.
    """

    def __init__(
        self, tokens: TokenAuthenticator, oidc: OidcVerifier | None = None
    ) -> None:
        self.tokens = tokens
        self.oidc = oidc

    async def authenticate(self, authorization: str | None) -> Identity:
        token = bearer_value(authorization)
        if token.count(".") == 2:
            if self.oidc is None:
                raise Unauthorized(
                    "this log accepts no OIDC tokens: no [oidc] issuers are configured"
                )
            return await self.oidc.authenticate(token)
        found = self.tokens.lookup(token)
        if found is None:
            raise Unauthorized("the bearer token is not valid for this log")
        return found
