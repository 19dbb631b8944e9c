"""The read API: the tlog-tiles static paths and JSON conveniences.

Everything is served for the latest published checkpoint: a tile or entry
bundle beyond it is 404, like a file not yet written to a static log.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from collections import OrderedDict
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from logserver.app import STATE, LogState, json_response
from logserver.errors import BadRequest, NotFound
from logserver.sequencer import PublishedCheckpoint
from verifier.errors import FormatError
from verifier.merkle import HASH_SIZE, leaf_hash
from verifier.tiles import TILE_WIDTH, encode_entry_bundle, parse_tile_path

IMMUTABLE = "public, max-age=31536000, immutable"
CHECKPOINT_CACHE = "no-cache"
_DECIMAL = re.compile(r"0|[1-9][0-9]{0,18}")
MAX_ARTIFACT_ENTRIES = 100
MAX_INT = 2**63 - 1  # what SQLite and PostgreSQL BIGINT hold


def _published(state: LogState) -> PublishedCheckpoint:
    checkpoint = state.sequencer.published
    if checkpoint is None:
        raise NotFound("the log has no checkpoint yet")
    return checkpoint


def _int_param(request: web.Request, name: str, default: int | None = None) -> int:
    raw = request.query.get(name)
    if raw is None:
        if default is None:
            raise BadRequest(f"query parameter {name!r} is required")
        return default
    if not _DECIMAL.fullmatch(raw) or int(raw) > MAX_INT:
        raise BadRequest(f"query parameter {name!r} must be a decimal below 2**63")
    return int(raw)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class BundleCache:
    """Full entry bundles never change, so the latest few are kept in memory."""

    def __init__(self, capacity: int = 256) -> None:
        self._bundles: OrderedDict[int, list[bytes]] = OrderedDict()
        self._capacity = capacity

    def get(self, index: int) -> list[bytes] | None:
        bundle = self._bundles.get(index)
        if bundle is not None:
            self._bundles.move_to_end(index)
        return bundle

    def put(self, index: int, bundle: list[bytes]) -> None:
        self._bundles[index] = bundle
        if len(self._bundles) > self._capacity:
            self._bundles.popitem(last=False)


BUNDLES = web.AppKey("bundles", BundleCache)


async def checkpoint(request: web.Request) -> web.Response:
    published = _published(request.app[STATE])
    return web.Response(
        body=published.note,
        content_type="text/plain",
        charset="utf-8",
        headers={"Cache-Control": CHECKPOINT_CACHE},
    )


async def tile(request: web.Request) -> web.Response:
    state = request.app[STATE]
    try:
        path = parse_tile_path("tile/" + request.match_info["tail"])
    except FormatError as exc:
        raise NotFound(f"not a tile path: {exc}") from exc
    size = _published(state).size
    level = 0 if path.level is None else path.level
    count = size >> (8 * level)
    available = min(TILE_WIDTH, count - path.index * TILE_WIDTH)
    if available < path.width:
        raise NotFound("no such tile in the published tree")

    if path.level is None:
        body = await _entry_bundle(request, path.index, path.width)
    else:
        body = state.sequencer.tree.tile(path.level, path.index, path.width)
    return web.Response(
        body=body,
        content_type="application/octet-stream",
        headers={"Cache-Control": IMMUTABLE},
    )


async def _entry_bundle(request: web.Request, index: int, width: int) -> bytes:
    cache = request.app[BUNDLES]
    leaves = cache.get(index)
    if leaves is None:
        first = index * TILE_WIDTH
        leaves = await request.app[STATE].storage.get_leaves(first, first + width)
        if width == TILE_WIDTH:
            cache.put(index, leaves)
    return encode_entry_bundle(leaves[:width])


def _entry_json(index: int, leaf: bytes) -> dict[str, Any]:
    return {
        "index": index,
        "leaf": _b64(leaf),
        "leaf_hash": _b64(leaf_hash(leaf)),
        "entry": orjson.loads(leaf),
    }


async def get_entry(request: web.Request) -> web.Response:
    state = request.app[STATE]
    raw = request.match_info["index"]
    if not _DECIMAL.fullmatch(raw):
        raise BadRequest("the entry index must be a decimal number")
    index = int(raw)
    published = _published(state)
    if index >= published.size:
        raise NotFound(f"entry {index} is not in the log (size {published.size})")
    (leaf,) = await state.storage.get_leaves(index, index + 1)
    body = _entry_json(index, leaf)
    body["inclusion_proof"] = _inclusion(state, index, published.size)
    body["checkpoint"] = published.note.decode()
    return json_response(body)


def _inclusion(state: LogState, index: int, tree_size: int) -> dict[str, Any]:
    proof = state.sequencer.tree.inclusion_proof(index, tree_size)
    return {
        "index": index,
        "tree_size": tree_size,
        "hashes": [_b64(h) for h in proof],
    }


async def inclusion_proof(request: web.Request) -> web.Response:
    state = request.app[STATE]
    published = _published(state)
    tree_size = _int_param(request, "tree_size", published.size)
    if not 0 < tree_size <= published.size:
        raise BadRequest(
            f"tree_size must be between 1 and the published size {published.size}"
        )
    if "leaf_hash" in request.query:
        if "index" in request.query:
            raise BadRequest("give index or leaf_hash, not both")
        try:
            wanted = base64.b64decode(request.query["leaf_hash"], validate=True)
        except (binascii.Error, ValueError):  # ValueError: non-ASCII text
            wanted = b""
        if len(wanted) != HASH_SIZE:
            raise BadRequest("leaf_hash must be a base64 SHA-256 hash")
        found = await state.storage.find_leaf_hash(wanted)
        if found is None or found >= tree_size:
            raise NotFound(f"no leaf with that hash in the tree of size {tree_size}")
        index = found
    else:
        index = _int_param(request, "index")
        if index >= tree_size:
            raise BadRequest(f"index {index} is not below tree_size {tree_size}")
    return json_response(_inclusion(state, index, tree_size))


async def consistency_proof(request: web.Request) -> web.Response:
    state = request.app[STATE]
    published = _published(state)
    old = _int_param(request, "old_size")
    new = _int_param(request, "new_size", published.size)
    if not 0 <= old <= new <= published.size:
        raise BadRequest(
            f"need 0 <= old_size <= new_size <= the published size {published.size}"
        )
    proof = state.sequencer.tree.consistency_proof(old, new)
    return json_response(
        {"old_size": old, "new_size": new, "hashes": [_b64(h) for h in proof]}
    )


async def artifact_entries(request: web.Request) -> web.Response:
    state = request.app[STATE]
    sha256 = request.match_info["sha256"]
    if not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise BadRequest("the artifact digest must be 64 lowercase hex digits")
    size = _published(state).size
    indexes = await state.storage.find_artifact(
        bytes.fromhex(sha256), MAX_ARTIFACT_ENTRIES
    )
    entries = []
    for index in indexes:
        if index < size:
            (leaf,) = await state.storage.get_leaves(index, index + 1)
            entries.append(_entry_json(index, leaf))
    return json_response({"entries": entries})


async def keys(request: web.Request) -> web.Response:
    state = request.app[STATE]
    artifact = [key.as_json() for key in state.keys.published]
    return json_response(
        {
            "origin": state.sequencer.origin,
            "checkpoint_key": state.keys.verifier_key,
            "artifact_keys": artifact,
        }
    )


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    published = state.sequencer.published
    return json_response(
        {
            "status": "ok",
            "tree_size": 0 if published is None else published.size,
            "pending": state.sequencer.pending,
            "uptime_seconds": round(time.monotonic() - state.started, 3),
        }
    )


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(
        body=generate_latest(state.metrics.registry),
        headers={"Content-Type": CONTENT_TYPE_LATEST},
    )


def add_routes(app: web.Application) -> None:
    app[BUNDLES] = BundleCache()
    app.router.add_get("/checkpoint", checkpoint)
    app.router.add_get("/tile/{tail:.+}", tile)
    # aiohttp tries a dynamic resource even when a plain one with the same
    # path (POST /api/v1/entries/batch, api_write.py) exists but not for the
    # method, and adds up their allowed methods. Keep "batch" out of {index}
    # so that any non-POST method there is 405 with Allow: POST, while other
    # non-decimal indexes still reach get_entry and its 400. The canonical
    # path (metrics, the OpenAPI test) stays /api/v1/entries/{index}.
    app.router.add_get(r"/api/v1/entries/{index:(?!batch\Z)[^{}/]+}", get_entry)
    app.router.add_get("/api/v1/proof/inclusion", inclusion_proof)
    app.router.add_get("/api/v1/proof/consistency", consistency_proof)
    app.router.add_get("/api/v1/artifacts/{sha256}", artifact_entries)
    app.router.add_get("/api/v1/keys", keys)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
