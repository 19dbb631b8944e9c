"""The write API: CI submits digests, single or in batches.

Each request is authenticated and rate limited, validated, and then decided
by the policy (`logserver.governance`); only an allowed request reaches the
sequencer and a key.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from logserver.app import STATE, json_response
from logserver.errors import BadRequest, Unprocessable, UnsupportedMediaType
from logserver.governance import Parked
from logserver.models import BatchSubmitRequest, SubmitRequest
from logserver.responses import entries_response, entry_response, request_document


async def _read_json(request: web.Request, model: type[BaseModel]) -> Any:
    if request.content_type != "application/json":
        raise UnsupportedMediaType(
            f"send the body as application/json, not {request.content_type!r}"
        )
    body = await request.read()
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(
            include_url=False, include_context=False, include_input=False
        )
        if any(e["type"] == "json_invalid" for e in errors):
            raise BadRequest("the body is not valid JSON", details=errors) from None
        raise Unprocessable(
            "the body does not match the schema", details=errors
        ) from None


async def submit(request: web.Request) -> web.Response:
    state = request.app[STATE]
    governance = state.governance
    identity = await governance.auth.authenticate(request.headers.get("Authorization"))
    governance.check_rate(identity)
    body: SubmitRequest = await _read_json(request, SubmitRequest)
    outcome = await governance.submit(identity, body)
    if isinstance(outcome, Parked):
        location = f"/api/v1/requests/{outcome.request.id}"
        return json_response(
            request_document(outcome.request, governance.origin),
            status=202,
            headers={"Location": location},
        )
    result = outcome.result
    return json_response(
        await entry_response(state, result), status=201 if result.created else 200
    )


async def submit_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    governance = state.governance
    identity = await governance.auth.authenticate(request.headers.get("Authorization"))
    governance.check_rate(identity)
    body: BatchSubmitRequest = await _read_json(request, BatchSubmitRequest)
    results = await governance.submit_batch(identity, body.entries)
    entries = await entries_response(state, results)
    created = any(r.created for r in results)
    return json_response({"entries": entries}, status=201 if created else 200)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/entries", submit)
    app.router.add_post("/api/v1/entries/batch", submit_batch)
