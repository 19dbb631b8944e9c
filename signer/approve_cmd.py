"""`signer approve`: approve (or reject) a parked ceremonial request.

    signer approve REQUEST_ID --log URL --key FILE [--reject]
                   [--sha256 HEX] [--origin ORIGIN] [--json]

The command fetches the request, shows on stderr what it is about to sign,
rebuilds the approval message itself from the request's fields (it never
signs bytes the server hands it), refuses if the server's copy differs, and
posts the signature. The key is an Ed25519 or ECDSA P-256/P-384 private key
in PEM; an encrypted one is opened with the password in
$SIGNER_APPROVER_PASSWORD. Exit status: 0 recorded, 1 failed, 2 usage.

`add_parser` and `run` are wired into `signer.cli` by its owner.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.types import PrivateKeyTypes
from cryptography.hazmat.primitives.serialization import load_pem_private_key

from verifier.approvals import (
    Decision,
    approval_message,
    approver_key_supported,
    sign_approval,
)
from verifier.leaf import public_key_id

PASSWORD_ENV = "SIGNER_APPROVER_PASSWORD"  # noqa: S105 (a variable's name)
MAX_RESPONSE = 4 << 20
_REQUEST_ID = re.compile(r"[0-9a-f]{32}")


class ApproveError(Exception):
    """The approval cannot be made; the message says why."""


def add_parser(subparsers: argparse._SubParsersAction[Any]) -> argparse.ArgumentParser:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "approve",
        help="approve or reject a ceremonial signing request",
        description="Approve (or with --reject, reject) a request that a "
        "ceremonial policy rule parked. Shows the request, signs its approval "
        "message with your approver key, and sends the signature to the log.",
    )
    parser.add_argument("request_id", metavar="REQUEST_ID", help="the request's ID")
    parser.add_argument("--log", required=True, metavar="URL", help="the log's URL")
    parser.add_argument(
        "--key",
        required=True,
        type=Path,
        metavar="FILE",
        help=f"approver private key, PEM (password in ${PASSWORD_ENV})",
    )
    parser.add_argument(
        "--reject", action="store_true", help="reject the request instead"
    )
    parser.add_argument(
        "--sha256",
        metavar="HEX",
        help="refuse unless the request is for this artifact digest",
    )
    parser.add_argument(
        "--origin", help="refuse unless the log's origin is this (from log.vkey)"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="HTTP timeout, s")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    parser.set_defaults(run=run)
    return parser


def _load_key(path: Path) -> PrivateKeyTypes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ApproveError(f"cannot read the key file: {exc}") from exc
    password = os.environ.get(PASSWORD_ENV)
    try:
        key = load_pem_private_key(
            data, password.encode() if password is not None else None
        )
    except TypeError as exc:
        raise ApproveError(
            f"{path} is encrypted: put its password in ${PASSWORD_ENV}"
        ) from exc
    except ValueError as exc:
        raise ApproveError(f"{path} is not a PEM private key: {exc}") from exc
    if not approver_key_supported(key.public_key()):
        raise ApproveError("approver keys must be Ed25519 or ECDSA P-256/P-384")
    return key


def _call(url: str, timeout: float, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data, headers)  # noqa: S310 (http(s) only)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:  # noqa: S310
            return json.loads(answer.read(MAX_RESPONSE))
    except urllib.error.HTTPError as exc:
        try:
            error = json.loads(exc.read(MAX_RESPONSE))["error"]
            message = error["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        raise ApproveError(f"the log answered {exc.code}: {message}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise ApproveError(f"cannot reach the log at {url}: {exc}") from exc


def _message(document: dict[str, Any], key_id: str, decision: Decision) -> bytes:
    request = document["request"]
    requester = request["requester"]
    return approval_message(
        origin=document["origin"],
        request_id=document["request_id"],
        rule=document["rule"],
        requester=(requester["issuer"], requester["subject"]),
        artifact=request["artifact"],
        source=request.get("source"),
        build=request.get("build"),
        key_id=request["key_id"],
        decision=decision,
    )


def _describe(document: dict[str, Any], decision: Decision) -> str:
    request = document["request"]
    artifact = request["artifact"]
    lines = [
        f"{decision} request {document['request_id']} on log {document['origin']}:",
        f"  artifact {artifact['name']!r} sha256 {artifact['sha256']}",
    ]
    source = request.get("source") or {}
    if source:
        lines.append(
            "  source " + ", ".join(f"{k} {v!r}" for k, v in sorted(source.items()))
        )
    requester = request["requester"]
    lines.append(f"  requested by {requester['issuer']} {requester['subject']!r}")
    lines.append(
        f"  rule {document['rule']!r}, key {request['key']!r} ({request['key_id']})"
    )
    return "\n".join(lines)


def approve(args: argparse.Namespace) -> dict[str, Any]:
    """Fetch, check, sign and post; return the request as the log now has it."""
    if not _REQUEST_ID.fullmatch(args.request_id):
        raise ApproveError("a request ID is 32 lowercase hex digits")
    base = args.log.rstrip("/") + "/"
    if urllib.parse.urlsplit(base).scheme not in ("http", "https"):
        raise ApproveError("--log must be an http(s) URL")
    decision: Decision = "reject" if args.reject else "approve"
    key = _load_key(args.key)
    key_id = public_key_id(key.public_key())

    url = f"{base}api/v1/requests/{args.request_id}"
    document = _call(url, args.timeout)
    ceremony = document.get("ceremony")
    if ceremony is None:
        raise ApproveError("this request needs no approvals")
    if document["state"] != "pending":
        raise ApproveError(f"the request is {document['state']}, not pending")
    if key_id not in {a["key_id"] for a in ceremony["approvers"]}:
        raise ApproveError(f"your key {key_id} is not an approver of this request")
    if args.sha256 and args.sha256 != document["request"]["artifact"]["sha256"]:
        raise ApproveError(
            f"the request is for sha256 {document['request']['artifact']['sha256']}, "
            f"not {args.sha256}"
        )
    if args.origin and args.origin != document["origin"]:
        raise ApproveError(
            f"the log's origin is {document['origin']!r}, not {args.origin!r}"
        )
    message = _message(document, key_id, decision)
    server_copy = base64.b64decode(ceremony["approval_message"])
    if decision == "approve" and message != server_copy:
        raise ApproveError(
            "the log's approval message differs from the one rebuilt from the "
            "request's fields; not signing"
        )
    print(_describe(document, decision), file=sys.stderr)
    signature = base64.b64encode(sign_approval(key, message)).decode()
    result: dict[str, Any] = _call(
        f"{url}/{decision}", args.timeout, {"key_id": key_id, "signature": signature}
    )
    return result


def run(args: argparse.Namespace) -> int:
    try:
        result = approve(args)
    except ApproveError as exc:
        print(f"signer: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(result, indent=2, sort_keys=True))
        return 0
    ceremony = result.get("ceremony", {})
    line = (
        f"request {result['request_id']}: {result['state']}, "
        f"{len(ceremony.get('approvals', []))} of {ceremony.get('threshold')} "
        "approvals"
    )
    if "entry_index" in result:
        line += f", logged at index {result['entry_index']}"
    print(line)
    return 0
