"""The write API: CI submits digests, single or in batches."""

from __future__ import annotations

import asyncio
import base64
from typing import Any

from aiohttp import web
from pydantic import BaseModel, ValidationError

from logserver.app import STATE, LogState, json_response
from logserver.errors import BadRequest, Unprocessable, UnsupportedMediaType
from logserver.leaves import build_leaf, dedup_key
from logserver.models import BatchSubmitRequest, SubmitRequest
from logserver.sequencer import Integrated, Submission
from verifier.merkle import leaf_hash


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


def _submission(state: LogState, body: SubmitRequest, identity: Any) -> Submission:
    keys = state.keys
    name = body.key or keys.default_artifact
    signer = keys.artifact.get(name)
    if signer is None:
        raise Unprocessable(
            f"no artifact key named {name!r}; known: {', '.join(sorted(keys.artifact))}"
        )
    decision = state.decision
    return Submission(
        dedup_key=dedup_key(body, identity, signer),
        digest=bytes.fromhex(body.artifact.sha256),
        sign=signer.sign_digests,
        signer_name=name,
        build_leaf=lambda _, signature: build_leaf(
            body, identity, decision, signer, signature
        ),
    )


async def entry_response(state: LogState, result: Integrated) -> dict[str, Any]:
    """What a submitter gets back: the leaf, its inclusion proof, the checkpoint."""
    leaf = result.leaf
    if leaf is None:
        (leaf,) = await state.storage.get_leaves(result.index, result.index + 1)
    checkpoint = result.checkpoint
    proof = state.sequencer.tree.inclusion_proof(result.index, checkpoint.size)
    return {
        "index": result.index,
        "leaf": base64.b64encode(leaf).decode(),
        "leaf_hash": base64.b64encode(leaf_hash(leaf)).decode(),
        "inclusion_proof": {
            "index": result.index,
            "tree_size": checkpoint.size,
            "hashes": [base64.b64encode(h).decode() for h in proof],
        },
        "checkpoint": checkpoint.note.decode(),
    }


async def submit(request: web.Request) -> web.Response:
    state = request.app[STATE]
    identity = state.auth.authenticate(request.headers.get("Authorization"))
    body: SubmitRequest = await _read_json(request, SubmitRequest)
    result = await state.sequencer.submit(_submission(state, body, identity))
    return json_response(
        await entry_response(state, result), status=201 if result.created else 200
    )


async def submit_batch(request: web.Request) -> web.Response:
    state = request.app[STATE]
    identity = state.auth.authenticate(request.headers.get("Authorization"))
    body: BatchSubmitRequest = await _read_json(request, BatchSubmitRequest)
    submissions = [_submission(state, entry, identity) for entry in body.entries]
    results = await asyncio.gather(*(state.sequencer.submit(s) for s in submissions))
    entries = [await entry_response(state, r) for r in results]
    created = any(r.created for r in results)
    return json_response({"entries": entries}, status=201 if created else 200)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/entries", submit)
    app.router.add_post("/api/v1/entries/batch", submit_batch)
