"""Request bodies of the write API, validated strictly from JSON."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

# Printable text: no control characters (Unicode category Cc), bounded length.
Text = Annotated[
    str,
    StringConstraints(
        min_length=1, max_length=1024, pattern=r"^[^\x00-\x1f\x7f-\x9f]+$"
    ),
]
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]
KeyName = Annotated[
    str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
]

MAX_BATCH_ENTRIES = 1000


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class ArtifactClaim(_Strict):
    name: Text = Field(description="The artifact's name, such as a file name.")
    sha256: Sha256Hex = Field(description="Lowercase hex SHA-256 of the artifact.")
    size: int | None = Field(
        default=None, ge=0, le=2**63 - 1, description="Size in bytes, if known."
    )


class SourceClaim(_Strict):
    repository: Text | None = None
    commit: Text | None = None
    ref: Text | None = None


class BuildClaim(_Strict):
    builder: Text | None = None
    invocation: Text | None = None


class SubmitRequest(_Strict):
    """One digest to sign and log."""

    artifact: ArtifactClaim
    source: SourceClaim | None = None
    build: BuildClaim | None = None
    key: KeyName | None = Field(
        default=None, description="Artifact key to sign with; the default if absent."
    )


class BatchSubmitRequest(_Strict):
    """Many digests in one request; answered when all are logged."""

    entries: list[SubmitRequest] = Field(min_length=1, max_length=MAX_BATCH_ENTRIES)


class VoteRequest(_Strict):
    """An approver's approval or rejection of a parked request."""

    key_id: Sha256Hex = Field(
        description="The approver key's ID: hex SHA-256 of its DER public key."
    )
    signature: str = Field(
        min_length=4,
        max_length=1024,
        pattern=r"^[A-Za-z0-9+/]+={0,2}$",
        description="Base64 signature over the request's approval message.",
    )
