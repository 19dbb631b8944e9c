"""Parked requests: waiting for a reproducibility quorum or for approvals.

A parked request moves through these states (SPEC.md section 9.6):

    collecting --k builders agree--> approved --signed--> logged
    collecting --k builders agree, ceremonial rule--> pending
    pending --m approvals--> approved --signed--> logged
    collecting --two digests--> denied
    pending --one rejection--> rejected
    collecting, pending --time passes--> expired

Its record is JSON in storage, so every server sharing a database sees the
same request. Everything here is pure: storage runs the transitions inside a
transaction (`Storage.update_request`).
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict

from logserver.auth import Identity
from logserver.models import SubmitRequest
from logserver.storage import RequestRow

State = Literal[
    "collecting", "pending", "approved", "logged", "denied", "rejected", "expired"
]
OPEN_STATES = ("collecting", "pending")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class IdentityRecord(_Record):
    issuer: str
    subject: str
    claims: dict[str, str] = {}

    @classmethod
    def of(cls, identity: Identity) -> IdentityRecord:
        return cls(
            issuer=identity.issuer, subject=identity.subject, claims=identity.claims
        )

    def identity(self) -> Identity:
        return Identity(self.issuer, self.subject, dict(self.claims))


class BuilderReport(_Record):
    issuer: str
    subject: str
    sha256: str
    time: int


class QuorumState(_Record):
    builders: int
    window_seconds: int
    reports: list[BuilderReport] = []

    def has(self, identity: Identity) -> bool:
        return any(
            (r.issuer, r.subject) == (identity.issuer, identity.subject)
            for r in self.reports
        )


class ApproverRecord(_Record):
    name: str
    key_id: str
    public_key_pem: str


class ApprovalRecord(_Record):
    key_id: str
    signature: str
    time: int


class CeremonyState(_Record):
    threshold: int
    expires_seconds: int
    approvers: list[ApproverRecord]
    approvals: list[ApprovalRecord] = []

    def approver(self, key_id: str) -> ApproverRecord | None:
        return next((a for a in self.approvers if a.key_id == key_id), None)

    def approved_by(self, key_id: str) -> bool:
        return any(a.key_id == key_id for a in self.approvals)


class ReasonRecord(_Record):
    code: str
    message: str


class PendingRequest(_Record):
    id: str
    lookup: str | None
    state: State
    rule: str
    mode: Literal["automated", "ceremonial"]
    policy_sha256: str
    created: int
    expires: int
    body: dict[str, Any]
    key_name: str
    key_id: str
    identity: IdentityRecord
    quorum: QuorumState | None = None
    ceremony: CeremonyState | None = None
    reasons: list[ReasonRecord] = []
    entry_index: int | None = None

    @property
    def sha256(self) -> str:
        digest: str = self.body["artifact"]["sha256"]
        return digest

    def submit_request(self) -> SubmitRequest:
        return SubmitRequest.model_validate(self.body)

    def dedup_key(self) -> bytes:
        """The entry's dedup key: one entry per parked request."""
        return hashlib.sha256(b"logsign/request\n" + self.id.encode()).digest()

    def current(self, now: int) -> PendingRequest:
        """This request as of `now`: an open request past its time has expired."""
        if self.state in OPEN_STATES and now >= self.expires:
            return self.model_copy(
                update={
                    "state": "expired",
                    "lookup": None,
                    "reasons": [
                        *self.reasons,
                        ReasonRecord(
                            code="expired",
                            message="the request expired before it was complete",
                        ),
                    ],
                }
            )
        return self

    def reusable(self, now: int) -> bool:
        """Whether a new request may take this one's lookup."""
        state = self.current(now).state
        return state in ("rejected", "expired") or (
            state == "denied" and now >= self.expires
        )

    def row(self) -> RequestRow:
        return RequestRow(
            self.id,
            self.lookup,
            self.state,
            self.expires,
            orjson.dumps(self.model_dump(mode="json")),
        )

    @classmethod
    def from_row(cls, row: RequestRow) -> PendingRequest:
        return cls.model_validate(orjson.loads(row.record))


def new_request_id() -> str:
    return secrets.token_hex(16)
