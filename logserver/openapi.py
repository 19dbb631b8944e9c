"""The OpenAPI document served at /openapi.json.

Request bodies come from the pydantic models, so the schema cannot drift from
validation; a test checks that every route is documented and nothing else.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from logserver import __name__ as _package
from logserver.models import BatchSubmitRequest, SubmitRequest, VoteRequest

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {},
            },
        }
    },
}

_PROOF = {
    "type": "object",
    "required": ["index", "tree_size", "hashes"],
    "properties": {
        "index": {"type": "integer"},
        "tree_size": {"type": "integer"},
        "hashes": {"type": "array", "items": {"type": "string", "format": "byte"}},
    },
}

_ENTRY = {
    "type": "object",
    "required": ["index", "leaf", "leaf_hash", "inclusion_proof", "checkpoint"],
    "properties": {
        "index": {"type": "integer"},
        "leaf": {"type": "string", "format": "byte"},
        "leaf_hash": {"type": "string", "format": "byte"},
        "inclusion_proof": {"$ref": "#/components/schemas/InclusionProof"},
        "checkpoint": {"type": "string"},
    },
}

_LEAF = {
    "type": "object",
    "required": ["index", "leaf", "leaf_hash", "entry"],
    "properties": {
        "index": {"type": "integer"},
        "leaf": {"type": "string", "format": "byte"},
        "leaf_hash": {"type": "string", "format": "byte"},
        "entry": {"type": "object", "description": "The leaf, parsed."},
        "inclusion_proof": {"$ref": "#/components/schemas/InclusionProof"},
        "checkpoint": {"type": "string"},
    },
}


def _json(schema: Any, description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema}},
    }


def _error(description: str) -> dict[str, Any]:
    return _json({"$ref": "#/components/schemas/Error"}, description)


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _binary(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {
            "application/octet-stream": {
                "schema": {"type": "string", "format": "binary"}
            }
        },
    }


def _int_query(name: str, description: str, required: bool = False) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": required,
        "description": description,
        "schema": {"type": "integer", "minimum": 0, "maximum": 2**63 - 1},
    }


_REQUEST = {
    "type": "object",
    "description": "A parked request (SPEC.md section 9.6).",
    "required": [
        "request_id",
        "state",
        "origin",
        "rule",
        "mode",
        "policy_sha256",
        "created",
        "expires",
        "request",
        "reasons",
    ],
    "properties": {
        "request_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
        "state": {
            "type": "string",
            "enum": [
                "collecting",
                "pending",
                "approved",
                "logged",
                "denied",
                "rejected",
                "expired",
            ],
        },
        "origin": {"type": "string"},
        "rule": {"type": "string"},
        "mode": {"type": "string", "enum": ["automated", "ceremonial"]},
        "policy_sha256": {"type": "string"},
        "created": {"type": "integer"},
        "expires": {"type": "integer"},
        "request": {"type": "object"},
        "reasons": {"type": "array", "items": {"type": "object"}},
        "quorum": {"type": "object"},
        "ceremony": {"type": "object"},
        "entry_index": {"type": "integer"},
        "entry": {"$ref": "#/components/schemas/Entry"},
    },
}

# What follows /tile/ (c2sp.org/tlog-tiles): level or "entries", the index in
# groups of three digits, and an optional partial width.
_TILE_TAIL = (
    r"^(entries|[0-9]|[1-5][0-9]|6[0-3])/(x[0-9]{3}/)*[0-9]{3}"
    r"(\.p/([1-9]|[1-9][0-9]|1[0-9]{2}|2[0-4][0-9]|25[0-5]))?$"
)

_REQUEST_ID_PARAM = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
}

_WRITE_ERRORS = {
    "400": _error("The body is not JSON."),
    "401": _error("No valid bearer token."),
    "403": _error("The policy denies the request; details lists the reasons."),
    "408": _error("The body did not arrive within body_timeout_seconds."),
    "413": _error("The body is too large."),
    "415": _error("The body is not application/json."),
    "422": _error("The body does not match the schema, or names an unknown key."),
    "429": _error("The caller is over its rate limit; retry after Retry-After."),
    "503": _error("Overloaded or a dependency is down; retry after Retry-After."),
}

_VOTE_ERRORS = {
    "400": _error("The body is not JSON."),
    "403": _error("Not an approver of this request, or a bad signature."),
    "404": _error("No such request."),
    "408": _error("The body did not arrive within body_timeout_seconds."),
    "409": _error("The request is not waiting for approvals."),
    "415": _error("The body is not application/json."),
    "422": _error("The body does not match the schema."),
    "503": _error("Overloaded or a dependency is down; retry after Retry-After."),
}


def _vote(summary: str) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": [_REQUEST_ID_PARAM],
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": _ref("VoteRequest")}},
            },
            "responses": {
                "200": _json(_ref("Request"), "Recorded; the request as it is now."),
                **_VOTE_ERRORS,
            },
        }
    }


def document() -> dict[str, Any]:
    submit_schema = SubmitRequest.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    batch_schema = BatchSubmitRequest.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    vote_schema = VoteRequest.model_json_schema(
        ref_template="#/components/schemas/{model}"
    )
    schemas: dict[str, Any] = {}
    for schema in (submit_schema, batch_schema, vote_schema):
        schemas.update(schema.pop("$defs", {}))
    schemas.update(
        SubmitRequest=submit_schema,
        BatchSubmitRequest=batch_schema,
        VoteRequest=vote_schema,
        Request=_REQUEST,
        Error=_ERROR,
        InclusionProof=_PROOF,
        Entry=_ENTRY,
        Leaf=_LEAF,
    )
    paths: dict[str, Any] = {
        "/api/v1/entries": {
            "post": {
                "summary": "Sign a digest and log it",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("SubmitRequest")}},
                },
                "responses": {
                    "201": _json(_ref("Entry"), "Logged: a new entry."),
                    "200": _json(_ref("Entry"), "Already logged: the existing entry."),
                    "202": _json(
                        _ref("Request"),
                        "Parked: waiting for a quorum or approvals; poll Location.",
                    ),
                    **_WRITE_ERRORS,
                },
            }
        },
        "/api/v1/requests/{id}": {
            "get": {
                "summary": "A parked request, and its entry once logged",
                "parameters": [_REQUEST_ID_PARAM],
                "responses": {
                    "200": _json(_ref("Request"), "The request."),
                    "404": _error("No such request."),
                },
            }
        },
        "/api/v1/requests/{id}/approve": _vote(
            "Approve a parked ceremonial request with an approver key's signature"
        ),
        "/api/v1/requests/{id}/reject": _vote(
            "Reject a parked ceremonial request with an approver key's signature"
        ),
        "/api/v1/audit": {
            "get": {
                "summary": "Policy decisions, oldest first (admin token)",
                "security": [{"bearer": []}],
                "parameters": [
                    _int_query("after", "Records with an ID above this; 0 if absent."),
                    _int_query("limit", "At most this many, 1 to 1000; 100 if absent."),
                    {
                        "name": "decision",
                        "in": "query",
                        "required": False,
                        "description": "Only records with this decision.",
                        "schema": {
                            "type": "string",
                            "enum": [
                                "allowed",
                                "denied",
                                "pending",
                                "approval",
                                "rejection",
                            ],
                        },
                    },
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["records", "next"],
                            "properties": {
                                "records": {
                                    "type": "array",
                                    "items": {"type": "object"},
                                },
                                "next": {"type": "integer"},
                            },
                        },
                        "Audit records; pass next as after for more.",
                    ),
                    "400": _error("Bad parameters."),
                    "401": _error("No valid admin token."),
                },
            }
        },
        "/api/v1/entries/batch": {
            "post": {
                "summary": "Sign and log many digests in one request",
                "security": [{"bearer": []}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("BatchSubmitRequest")}
                    },
                },
                "responses": {
                    "201": _json(
                        {
                            "type": "object",
                            "required": ["entries"],
                            "properties": {
                                "entries": {"type": "array", "items": _ref("Entry")}
                            },
                        },
                        "Logged; entries in request order.",
                    ),
                    "200": _json(
                        {
                            "type": "object",
                            "properties": {"entries": {"type": "array"}},
                        },
                        "Every entry was already logged.",
                    ),
                    **_WRITE_ERRORS,
                },
            }
        },
        "/api/v1/entries/{index}": {
            "get": {
                "summary": "One entry and its inclusion proof in the latest checkpoint",
                "parameters": [
                    {
                        "name": "index",
                        "in": "path",
                        "required": True,
                        "schema": {
                            "type": "integer",
                            "minimum": 0,
                            "maximum": 2**63 - 1,
                        },
                    }
                ],
                "responses": {
                    "200": _json(_ref("Leaf"), "The entry."),
                    "400": _error("The index is not a decimal number."),
                    "404": _error("No such entry in the published tree."),
                },
            }
        },
        "/api/v1/proof/inclusion": {
            "get": {
                "summary": "Inclusion proof by index or by leaf hash",
                "parameters": [
                    _int_query("index", "Leaf index; or give leaf_hash."),
                    {
                        "name": "leaf_hash",
                        "in": "query",
                        "required": False,
                        "description": "Base64 RFC 6962 leaf hash (32 bytes).",
                        "schema": {
                            "type": "string",
                            "pattern": "^[A-Za-z0-9+/]{43}=$",
                        },
                    },
                    _int_query("tree_size", "Tree size; the latest if absent."),
                ],
                "responses": {
                    "200": _json(_ref("InclusionProof"), "The proof."),
                    "400": _error("Bad parameters."),
                    "404": _error("No such leaf in that tree."),
                },
            }
        },
        "/api/v1/proof/consistency": {
            "get": {
                "summary": "Consistency proof between two tree sizes",
                "parameters": [
                    _int_query("old_size", "The smaller tree size.", required=True),
                    _int_query("new_size", "The larger size; the latest if absent."),
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["old_size", "new_size", "hashes"],
                            "properties": {
                                "old_size": {"type": "integer"},
                                "new_size": {"type": "integer"},
                                "hashes": {
                                    "type": "array",
                                    "items": {"type": "string"},
                                },
                            },
                        },
                        "The proof.",
                    ),
                    "400": _error("Bad parameters."),
                },
            }
        },
        "/api/v1/artifacts/{sha256}": {
            "get": {
                "summary": "Entries logged for an artifact digest (at most 100)",
                "parameters": [
                    {
                        "name": "sha256",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    }
                ],
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["entries"],
                            "properties": {
                                "entries": {"type": "array", "items": _ref("Leaf")}
                            },
                        },
                        "Matching entries, oldest first.",
                    ),
                    "400": _error("Not a hex SHA-256 digest."),
                },
            }
        },
        "/api/v1/keys": {
            "get": {
                "summary": "The log's public keys",
                "responses": {"200": _json({"type": "object"}, "Keys.")},
            }
        },
        "/checkpoint": {
            "get": {
                "summary": "The latest signed checkpoint (c2sp.org/tlog-checkpoint)",
                "responses": {
                    "200": {
                        "description": "A signed note.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    },
                    "404": _error("The log has no checkpoint yet."),
                },
            }
        },
        "/tile/{tail}": {
            "get": {
                "summary": "Hash tiles and entry bundles (c2sp.org/tlog-tiles)",
                "description": "tile/<L>/<N>[.p/<W>] or tile/entries/<N>[.p/<W>]; "
                "<N> in groups of three digits, all but the last prefixed with x.",
                "parameters": [
                    {
                        "name": "tail",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "pattern": _TILE_TAIL},
                    }
                ],
                "responses": {
                    "200": _binary("The tile."),
                    "404": _error("Not a tile path, or beyond the published tree."),
                },
            }
        },
        "/healthz": {
            "get": {
                "summary": "Liveness and tree size",
                "responses": {"200": _json({"type": "object"}, "Healthy.")},
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "Text exposition format.",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
        "/openapi.json": {
            "get": {
                "summary": "This document",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "logsign transparency-log signing service",
            "version": "1",
            "description": f"The HTTP API of {_package}; see SPEC.md.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


async def openapi(request: web.Request) -> web.Response:
    from logserver.app import json_response

    return json_response(document())


def add_routes(app: web.Application) -> None:
    app.router.add_get("/openapi.json", openapi)
