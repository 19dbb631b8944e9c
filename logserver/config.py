"""Server configuration: a TOML file, overridden by command-line flags.

Every setting has a default that makes `logserver serve` work on a fresh
machine: SQLite and software keys under ./data.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from signer.keys import ARTIFACT_ALGORITHMS, ECDSA_P256_SHA256
from signer.pkcs11_config import Pkcs11Config

Origin = Annotated[str, StringConstraints(pattern=r"^[!-*,-~]{1,255}$")]
KeyName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
]


class ConfigError(Exception):
    """The configuration cannot be used; the message says what to fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _KeyLocation(_Section):
    """Where one key lives: a file under DATA/secrets/, or a PKCS#11 token."""

    backend: Literal["software", "pkcs11"] = "software"
    pkcs11: Pkcs11Config | None = Field(
        default=None, description="token and key, for backend = 'pkcs11'"
    )

    @model_validator(mode="after")
    def _backend_has_its_settings(self) -> _KeyLocation:
        if self.backend == "pkcs11" and self.pkcs11 is None:
            raise ValueError("backend = 'pkcs11' needs a [...pkcs11] table")
        if self.backend == "software" and self.pkcs11 is not None:
            raise ValueError("a [...pkcs11] table needs backend = 'pkcs11'")
        return self


class KeyConfig(_KeyLocation):
    """An artifact-signing key."""

    algorithm: str = ECDSA_P256_SHA256
    retired: bool = Field(
        default=False,
        description="published so old signatures verify, but never used to sign",
    )


class CheckpointKeyConfig(_KeyLocation):
    """The checkpoint note key: always Ed25519."""

    algorithm: Literal["ed25519"] = "ed25519"


class SequencerConfig(_Section):
    max_batch: int = Field(default=1000, ge=1, le=100_000)
    linger_ms: float = Field(default=2.0, ge=0, le=1000)
    max_pending: int = Field(default=20_000, ge=1, le=10_000_000)


class OidcIssuerConfig(_Section):
    """One CI OIDC issuer whose ID tokens the log accepts."""

    issuer: str = Field(min_length=1, description="the tokens' `iss`, exactly")
    audience: str = Field(min_length=1, description="the `aud` tokens must carry")
    provider: Literal["github", "gitlab", "generic"] = Field(
        default="generic", description="how the issuer's claims map to policy claims"
    )
    jwks_url: str | None = Field(default=None, description="https URL of the JWKS")
    jwks_file: Path | None = Field(default=None, description="JWKS in a local file")

    @model_validator(mode="after")
    def _one_jwks_source(self) -> OidcIssuerConfig:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("give exactly one of jwks_url and jwks_file")
        return self


class OidcConfig(_Section):
    issuers: list[OidcIssuerConfig] = Field(default_factory=list)
    leeway_seconds: int = Field(default=30, ge=0, le=300)
    jwks_cache_seconds: int = Field(default=3600, ge=0, le=86400)
    jwks_refresh_seconds: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="least time between two fetches for an unknown key ID",
    )
    fetch_timeout_seconds: float = Field(default=10.0, gt=0, le=120)


class Config(_Section):
    data: Path = Path("data")
    listen: str = "127.0.0.1:8080"
    database: str | None = Field(
        default=None, description="sqlite:///PATH or postgresql://...; DATA/log.db"
    )
    origin: Origin | None = Field(
        default=None, description="checkpoint origin; fixed at first start"
    )
    public_url: str | None = None
    tls_cert: Path | None = Field(
        default=None, description="PEM certificate chain: serve HTTPS with it"
    )
    tls_key: Path | None = Field(
        default=None, description="PEM private key (unencrypted) of tls_cert"
    )
    max_body_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    idle_timeout_seconds: float = Field(
        default=75.0,
        gt=0,
        le=3600,
        description="close a connection that has not sent a whole request "
        "head this long after it opened or after its last answer",
    )
    body_timeout_seconds: float = Field(
        default=30.0,
        gt=0,
        le=3600,
        description="answer 408 when a request body has not fully arrived "
        "this long after its head",
    )
    log_format: Literal["text", "json"] = "text"
    sequencer: SequencerConfig = SequencerConfig()
    checkpoint_key: CheckpointKeyConfig = CheckpointKeyConfig()
    artifact_keys: dict[KeyName, KeyConfig] = Field(
        default_factory=lambda: {"default": KeyConfig()}
    )
    default_artifact_key: KeyName = "default"
    policy: Path | None = Field(
        default=None, description="policy TOML; the built-in bootstrap rule if absent"
    )
    tokens: Path | None = Field(
        default=None, description="tokens file: NAME sha256:HEX lines"
    )
    oidc: OidcConfig = OidcConfig()

    @model_validator(mode="after")
    def _tls_needs_both_files(self) -> Config:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("give both tls_cert and tls_key, or neither")
        return self

    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data / 'log.db'}"

    def listen_address(self) -> tuple[str, int]:
        host, sep, port = self.listen.rpartition(":")
        if not sep or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"listen address {self.listen!r} is not HOST:PORT")
        return host.strip("[]") or "127.0.0.1", int(port)


def load_config(path: Path | None, **overrides: object) -> Config:
    """Read `path` (if given), apply the non-None overrides, and validate."""
    values: dict[str, object] = {}
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    values.update({k: v for k, v in overrides.items() if v is not None})
    try:
        config = Config.model_validate(values)
    except ValidationError as exc:
        where = f" in {path}" if path else ""
        raise ConfigError(f"invalid configuration{where}:\n{exc}") from exc
    default = config.artifact_keys.get(config.default_artifact_key)
    if default is not None and default.retired:
        raise ConfigError(
            f"default_artifact_key {config.default_artifact_key!r} is retired: "
            "make another key the default"
        )
    if default is None:
        raise ConfigError(
            f"default_artifact_key {config.default_artifact_key!r} is not one of "
            f"the artifact_keys ({', '.join(sorted(config.artifact_keys))})"
        )
    for name, key in config.artifact_keys.items():
        if key.algorithm not in ARTIFACT_ALGORITHMS:
            raise ConfigError(
                f"artifact key {name!r}: algorithm {key.algorithm!r} is not one of "
                f"{', '.join(ARTIFACT_ALGORITHMS)}"
            )
    issuers = [i.issuer for i in config.oidc.issuers]
    if len(set(issuers)) != len(issuers):
        raise ConfigError("each [[oidc.issuers]] issuer may be configured only once")
    config.listen_address()
    return config
