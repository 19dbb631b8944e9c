"""The reproducibility quorum: k builders must report the same digest.

Reports are grouped by rule, artifact name and source commit (the lookup).
The first report opens a request that collects reports for the rule's
window; each further report from a builder not yet counted is added, and
the one that brings the count to k completes the quorum. A report with
another digest is a conflict: an open request is denied, and the conflict
is recorded and counted whatever state the request is in.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import orjson

from logserver.auth import Identity
from logserver.pending import BuilderReport, PendingRequest, ReasonRecord
from logserver.policy import Reason


def quorum_lookup(rule: str, artifact: str, commit: str) -> str:
    material = orjson.dumps([rule, artifact, commit])
    return "quorum:" + hashlib.sha256(material).hexdigest()


@dataclass(frozen=True, slots=True)
class Report:
    """What one report did to the request it was added to."""

    request: PendingRequest
    created: bool = False
    completed: bool = False
    conflict: Reason | None = None
    refused: Reason | None = None


def add_report(
    found: PendingRequest | None,
    fresh: PendingRequest,
    builder: Identity,
    now: int,
) -> tuple[list[PendingRequest], Report]:
    """Add `builder`'s report of `fresh` to the request `found` for its lookup.

    `fresh` is the request this report would open. Returns the requests to
    write (in order) and what happened.
    """
    assert fresh.quorum is not None
    report = BuilderReport(
        issuer=builder.issuer, subject=builder.subject, sha256=fresh.sha256, time=now
    )
    if found is None or found.reusable(now):
        writes = (
            []
            if found is None
            else [found.current(now).model_copy(update={"lookup": None})]
        )
        opened = fresh.model_copy(
            update={"quorum": fresh.quorum.model_copy(update={"reports": [report]})}
        )
        return [*writes, opened], Report(opened, created=True)

    request = found.current(now)
    quorum = request.quorum
    assert quorum is not None
    if fresh.sha256 != request.sha256:
        agreeing = sum(1 for r in quorum.reports if r.sha256 == request.sha256)
        conflict = Reason(
            "quorum_conflict",
            f"{builder.issuer} {builder.subject!r} reports sha256 {fresh.sha256} for "
            f"{fresh.body['artifact']['name']!r} at commit "
            f"{fresh.body['source']['commit']!r}, but {agreeing} builder(s) "
            f"reported {request.sha256}",
        )
        if request.state not in ("collecting", "pending"):
            return [], Report(request, conflict=conflict)
        denied = request.model_copy(
            update={
                "state": "denied",
                "reasons": [*request.reasons, ReasonRecord(**conflict.as_json())],
                "quorum": quorum.model_copy(
                    update={"reports": [*quorum.reports, report]}
                ),
            }
        )
        return [denied], Report(denied, conflict=conflict)
    if request.state == "denied":
        return [], Report(request)
    if fresh.key_id != request.key_id:
        refused = Reason(
            "quorum_key_mismatch",
            f"the quorum for this artifact and commit is collecting for key "
            f"{request.key_name!r}; this report asks for {fresh.key_name!r}",
        )
        return [], Report(request, refused=refused)
    if request.state != "collecting" or quorum.has(builder):
        return [], Report(request)

    reports = [*quorum.reports, report]
    update: dict[str, object] = {
        "quorum": quorum.model_copy(update={"reports": reports})
    }
    completed = len(reports) >= quorum.builders
    if completed:
        if request.ceremony is not None:
            update["state"] = "pending"
            update["expires"] = now + request.ceremony.expires_seconds
        else:
            update["state"] = "approved"
    updated = request.model_copy(update=update)
    return [updated], Report(updated, completed=completed)
