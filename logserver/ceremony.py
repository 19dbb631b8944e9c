"""Ceremonial signing: m of the n approvers listed in the rule must approve.

A ceremonial request is parked until m distinct approver keys have signed
its approval message (`verifier.approvals.approval_message`). One key
approving twice counts once; one rejection by a listed approver ends the
request; a request that is not approved in time expires.

Signatures are checked before the request is locked (they depend only on
parts of the record that never change); the transitions below only count.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

from cryptography.hazmat.primitives.serialization import load_pem_public_key

from logserver.pending import ApprovalRecord, PendingRequest, ReasonRecord
from verifier.approvals import (
    Decision,
    approval_message,
    verify_approval_signature,
)
from verifier.errors import VerificationError


def request_message(
    request: PendingRequest, origin: str, decision: Decision = "approve"
) -> bytes:
    """The approval (or rejection) message of a parked request."""
    return approval_message(
        origin=origin,
        request_id=request.id,
        rule=request.rule,
        requester=(request.identity.issuer, request.identity.subject),
        artifact=request.body["artifact"],
        source=request.body.get("source"),
        build=request.body.get("build"),
        key_id=request.key_id,
        decision=decision,
    )


def check_signature(
    request: PendingRequest,
    origin: str,
    key_id: str,
    signature: str,
    decision: Decision,
) -> None:
    """Raise `VerificationError` unless a listed approver signed `decision`."""
    assert request.ceremony is not None
    approver = request.ceremony.approver(key_id)
    if approver is None:
        raise LookupError(key_id)
    try:
        raw = base64.b64decode(signature, validate=True)
    except binascii.Error as exc:
        raise VerificationError("the signature is not base64") from exc
    public_key = load_pem_public_key(approver.public_key_pem.encode())
    verify_approval_signature(
        public_key, request_message(request, origin, decision), raw
    )


@dataclass(frozen=True, slots=True)
class Vote:
    """What one approval or rejection did."""

    request: PendingRequest
    counted: bool = False


def open_request(
    found: PendingRequest | None, fresh: PendingRequest, now: int
) -> tuple[list[PendingRequest], PendingRequest, bool]:
    """The open request for a repeated submission, or `fresh` if there is none."""
    if found is None or found.reusable(now):
        writes = (
            []
            if found is None
            else [found.current(now).model_copy(update={"lookup": None})]
        )
        return [*writes, fresh], fresh, True
    return [], found.current(now), False


def approve(
    found: PendingRequest, key_id: str, signature: str, now: int
) -> tuple[list[PendingRequest], Vote]:
    request = found.current(now)
    ceremony = request.ceremony
    assert ceremony is not None
    if request.state == "expired" and found.state != "expired":
        return [request], Vote(request)
    if request.state != "pending" or ceremony.approved_by(key_id):
        return [], Vote(request)
    approvals = [
        *ceremony.approvals,
        ApprovalRecord(key_id=key_id, signature=signature, time=now),
    ]
    update: dict[str, object] = {
        "ceremony": ceremony.model_copy(update={"approvals": approvals})
    }
    if len(approvals) >= ceremony.threshold:
        update["state"] = "approved"
    updated = request.model_copy(update=update)
    return [updated], Vote(updated, counted=True)


def reject(
    found: PendingRequest, approver: str, now: int
) -> tuple[list[PendingRequest], Vote]:
    request = found.current(now)
    if request.state == "expired" and found.state != "expired":
        return [request], Vote(request)
    if request.state != "pending":
        return [], Vote(request)
    reason = ReasonRecord(code="rejected", message=f"approver {approver!r} rejected it")
    updated = request.model_copy(
        update={
            "state": "rejected",
            "lookup": None,
            "reasons": [*request.reasons, reason],
        }
    )
    return [updated], Vote(updated, counted=True)
