"""JSON bodies shared by the write and governance routes."""

from __future__ import annotations

import binascii
from collections.abc import Iterator, Sequence
from typing import Any

from logserver.app import LogState
from logserver.ceremony import request_message
from logserver.pending import PendingRequest
from logserver.sequencer import Integrated
from verifier.merkle import leaf_hash


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode()


def _entry_json(result: Integrated, leaf: bytes, proof: list[str]) -> dict[str, Any]:
    checkpoint = result.checkpoint
    hashed = result.leaf_hash if result.leaf_hash is not None else leaf_hash(leaf)
    return {
        "index": result.index,
        "leaf": _b64(leaf),
        "leaf_hash": _b64(hashed),
        "inclusion_proof": {
            "index": result.index,
            "tree_size": checkpoint.size,
            "hashes": proof,
        },
        "checkpoint": checkpoint.text,
    }


async def entry_response(state: LogState, result: Integrated) -> dict[str, Any]:
    """What a submitter gets back: the leaf, its inclusion proof, the checkpoint."""
    (entry,) = await entries_response(state, [result])
    return entry


async def entries_response(
    state: LogState, results: Sequence[Integrated]
) -> list[dict[str, Any]]:
    """`entry_response` for each of a batch's results, in order.

    A batch's entries mostly sit side by side under one checkpoint, and the
    proofs of neighbours share most of their hashes: each run of them is
    proved by one walk of the tree.
    """
    tree = state.sequencer.tree
    entries = []
    proofs: Iterator[list[str]] | None = None
    following = (-1, -1)  # (index, tree size) that would continue the run
    for result in results:
        leaf = result.leaf
        if leaf is None:
            # Found in the log rather than added now: read it back.
            (leaf,) = await state.storage.get_leaves(result.index, result.index + 1)
        size = result.checkpoint.size
        if proofs is None or following != (result.index, size):
            proofs = tree.inclusion_proofs(result.index, size, _b64)
        entries.append(_entry_json(result, leaf, next(proofs)))
        following = (result.index + 1, size)
    return entries


def request_document(request: PendingRequest, origin: str) -> dict[str, Any]:
    """A parked request as GET /api/v1/requests/{id} serves it (SPEC 9.6)."""
    body = request.body
    described: dict[str, Any] = {"artifact": body["artifact"]}
    for member in ("source", "build"):
        if member in body:
            described[member] = body[member]
    described.update(
        key=request.key_name,
        key_id=request.key_id,
        requester={
            "issuer": request.identity.issuer,
            "subject": request.identity.subject,
            "claims": request.identity.claims,
        },
    )
    document: dict[str, Any] = {
        "request_id": request.id,
        "state": request.state,
        "origin": origin,
        "rule": request.rule,
        "mode": request.mode,
        "policy_sha256": request.policy_sha256,
        "created": request.created,
        "expires": request.expires,
        "request": described,
        "reasons": [r.model_dump() for r in request.reasons],
    }
    if request.quorum is not None:
        document["quorum"] = {
            "builders": request.quorum.builders,
            "window_seconds": request.quorum.window_seconds,
            "reports": [r.model_dump() for r in request.quorum.reports],
        }
    if request.ceremony is not None:
        document["ceremony"] = {
            "threshold": request.ceremony.threshold,
            "approvers": [
                {"name": a.name, "key_id": a.key_id} for a in request.ceremony.approvers
            ],
            "approvals": [a.model_dump() for a in request.ceremony.approvals],
            "approval_message": _b64(request_message(request, origin)),
        }
    if request.entry_index is not None:
        document["entry_index"] = request.entry_index
    return document
