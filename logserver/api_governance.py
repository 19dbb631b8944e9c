"""Governance routes: parked requests, approvals, and the audit table.

    GET  /api/v1/requests/{id}          a parked request, and its entry once logged
    POST /api/v1/requests/{id}/approve  an approver's signed approval
    POST /api/v1/requests/{id}/reject   an approver's signed rejection
    GET  /api/v1/audit                  decisions, for operators (admin token)

Approvers authenticate by their signatures, not by tokens: the approve and
reject bodies are checked against the approver keys the rule listed.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from logserver.api_read import MAX_INT
from logserver.api_write import _read_json
from logserver.app import STATE, LogState, json_response
from logserver.audit import ALLOWED, APPROVAL, DENIED, PENDING, REJECTION, audit_json
from logserver.errors import BadRequest, NotFound
from logserver.models import VoteRequest
from logserver.pending import PendingRequest
from logserver.responses import entry_response, request_document
from logserver.sequencer import Integrated
from verifier.approvals import Decision

_REQUEST_ID = re.compile(r"[0-9a-f]{32}")
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
_DECISIONS = (ALLOWED, DENIED, PENDING, APPROVAL, REJECTION)
MAX_AUDIT_RECORDS = 1000


def _request_id(request: web.Request) -> str:
    request_id = request.match_info["id"]
    if not _REQUEST_ID.fullmatch(request_id):
        raise NotFound("a request ID is 32 lowercase hex digits")
    return request_id


async def _document(
    state: LogState, parked: PendingRequest, result: Integrated | None = None
) -> dict[str, Any]:
    governance = state.governance
    document = request_document(parked, governance.origin)
    if result is None and parked.entry_index is not None:
        published = state.sequencer.published
        if published is not None and parked.entry_index < published.size:
            result = governance.existing(parked.entry_index)
    if result is not None:
        document["entry"] = await entry_response(state, result)
    return document


async def get_request(request: web.Request) -> web.Response:
    state = request.app[STATE]
    parked = await state.governance.get(_request_id(request))
    return json_response(await _document(state, parked))


async def _vote(request: web.Request, decision: Decision) -> web.Response:
    state = request.app[STATE]
    request_id = _request_id(request)
    body: VoteRequest = await _read_json(request, VoteRequest)
    parked, result = await state.governance.vote(
        request_id, body.key_id, body.signature, decision
    )
    return json_response(await _document(state, parked, result))


async def approve(request: web.Request) -> web.Response:
    return await _vote(request, "approve")


async def reject(request: web.Request) -> web.Response:
    return await _vote(request, "reject")


def _query_int(request: web.Request, name: str, default: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not _DECIMAL.fullmatch(raw) or int(raw) > MAX_INT:
        raise BadRequest(f"query parameter {name!r} must be a decimal below 2**63")
    return int(raw)


async def audit(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.admin.authenticate(request.headers.get("Authorization"))
    after = _query_int(request, "after", 0)
    limit = _query_int(request, "limit", 100)
    if not 1 <= limit <= MAX_AUDIT_RECORDS:
        raise BadRequest(f"limit must be between 1 and {MAX_AUDIT_RECORDS}")
    decision = request.query.get("decision")
    if decision is not None and decision not in _DECISIONS:
        raise BadRequest(f"decision must be one of {', '.join(_DECISIONS)}")
    rows = await state.storage.list_audit(after, limit, decision)
    records = [audit_json(index, row) for index, row in rows]
    return json_response(
        {"records": records, "next": records[-1]["id"] if records else after}
    )


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/requests/{id}", get_request)
    app.router.add_post("/api/v1/requests/{id}/approve", approve)
    app.router.add_post("/api/v1/requests/{id}/reject", reject)
    app.router.add_get("/api/v1/audit", audit)
