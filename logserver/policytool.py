"""`logserver policy check` and `logserver token create`, for operators.

Results go to stdout, diagnoses to stderr. Exit status: 0 valid (and
allowed), 1 invalid or denied, 2 usage.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import orjson
from pydantic import ValidationError

from logserver.auth import TOKEN_ISSUER, Identity, new_token_line
from logserver.config import ConfigError, load_config
from logserver.models import SubmitRequest
from logserver.policy import (
    IDENTITY_CLAIMS,
    Evaluation,
    Policy,
    PolicyError,
    evaluate,
    load_policy,
)


def _fail(message: str, code: int = 1) -> int:
    print(f"logserver: {message}", file=sys.stderr)
    return code


def _identity(args: argparse.Namespace) -> Identity:
    claims: dict[str, str] = {}
    for item in args.claim:
        name, sep, value = item.partition("=")
        if not sep or name not in IDENTITY_CLAIMS or name in ("issuer", "subject"):
            raise ValueError(
                f"--claim {item!r}: give NAME=VALUE with NAME one of "
                f"{', '.join(IDENTITY_CLAIMS[2:])}"
            )
        claims[name] = value
    return Identity(args.issuer or TOKEN_ISSUER, args.subject, claims)


def _request(args: argparse.Namespace) -> SubmitRequest:
    if args.request is not None:
        body: dict[str, Any] = orjson.loads(args.request.read_bytes())
    else:
        body = {"artifact": {"name": args.artifact or "artifact", "sha256": "0" * 64}}
        if args.commit:
            body["source"] = {"commit": args.commit}
    if args.artifact and args.request is not None:
        body["artifact"]["name"] = args.artifact
    if args.key:
        body["key"] = args.key
    return SubmitRequest.model_validate(body)


def _decision_json(evaluation: Evaluation) -> dict[str, Any]:
    rule = evaluation.rule
    return {
        "allowed": evaluation.allowed,
        "rule": evaluation.rule_name,
        "mode": None if rule is None else rule.mode,
        "quorum": None if rule is None or rule.quorum is None else rule.quorum.builders,
        "approvals": None
        if rule is None or rule.ceremony is None
        else rule.ceremony.threshold,
        "reasons": [r.as_json() for r in evaluation.reasons],
        "skipped": [{"rule": name, "why": why} for name, why in evaluation.skipped],
        "explanation": evaluation.explain(),
    }


def _key_warnings(policy: Policy, config_path: Path) -> tuple[list[str], str]:
    config = load_config(config_path)
    known = set(config.artifact_keys)
    warnings = [
        f"rule {rule.name!r} names key {p.text!r}, which {config_path} "
        "does not configure"
        for rule in policy.rules
        for p in rule.keys
        if "*" not in p.text and p.text not in known
    ]
    return warnings, config.default_artifact_key


def check(args: argparse.Namespace) -> int:
    try:
        policy = load_policy(args.file)
    except PolicyError as exc:
        return _fail(str(exc))
    warnings = list(policy.warnings)
    default_key = "default"
    if args.config is not None:
        try:
            extra, default_key = _key_warnings(policy, args.config)
        except ConfigError as exc:
            return _fail(str(exc), 2)
        warnings += extra

    explaining = any(
        (args.issuer, args.subject, args.claim, args.request, args.artifact, args.key)
    )
    evaluation = None
    if explaining:
        if not args.subject:
            return _fail("explaining a decision needs --subject", 2)
        try:
            identity = _identity(args)
            request = _request(args)
        except (ValueError, OSError, ValidationError) as exc:
            return _fail(f"cannot build the request: {exc}", 2)
        evaluation = evaluate(policy, identity, request, request.key or default_key)

    if args.json:
        report: dict[str, Any] = {
            "valid": True,
            "policy_sha256": policy.sha256,
            "rules": [rule.name for rule in policy.rules],
            "warnings": warnings,
        }
        if evaluation is not None:
            report["decision"] = _decision_json(evaluation)
        print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    else:
        print(
            f"{args.file}: valid policy, {len(policy.rules)} rules, "
            f"sha256 {policy.sha256}"
        )
        for warning in warnings:
            print(f"warning: {warning}")
        if evaluation is not None:
            for line in evaluation.explain():
                print(line)
    return 0 if evaluation is None or evaluation.allowed else 1


def _append_line(path: Path, line: str) -> None:
    """Add `line` to the end of `path` (created 0600) in one write, durably.

    A file whose last line has no newline gets one first, so the new line
    never runs into it.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
    try:
        data = line.encode() + b"\n"
        end = os.lseek(fd, 0, os.SEEK_END)
        if end > 0 and os.pread(fd, 1, end - 1) != b"\n":
            data = b"\n" + data
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def create_token(args: argparse.Namespace) -> int:
    try:
        token, line = new_token_line(args.name)
    except ValueError as exc:
        return _fail(str(exc), 2)
    if args.append is not None:
        try:
            _append_line(args.append, line)
        except OSError as exc:
            return _fail(f"cannot append to {args.append}: {exc}")
        print(f"added to {args.append}: {line}", file=sys.stderr)
    else:
        print(f"add this line to the tokens file: {line}", file=sys.stderr)
    print("then send the server SIGHUP; the token is not shown again", file=sys.stderr)
    print(token)
    return 0
