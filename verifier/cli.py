"""`verifier`: check artifacts against their bundles, and watch or audit a log.

    verifier verify FILE [--bundle B] --log-key VKEY --key PEM [--key PEM...]
                    [--online --log URL] [--expect-identity S] [--expect-issuer I]
                    [--expect-repository R] [--expect-ref R] [--expect-builder B]
                    [--expect-rule R] [--json]
    verifier monitor --log URL --log-key VKEY --state DIR [--watch RULES.toml]
                     [--rebuild DIR | --manifest FILE] [--key PEM...]
                     [--webhook URL] [--foreign] [--once] [--interval S]
    verifier audit --log URL|DIR --log-key VKEY [--foreign] [--jobs N]
                   [--progress] [--json]

`verify` is offline unless asked: without --online it opens no connection.
Results go to stdout, diagnoses to stderr. Exit status: 0 verified (or no
alert, or a clean audit), 1 failed, 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from types import FrameType
from typing import Any

from verifier.audit import AuditReport, audit_log
from verifier.bundle import MAX_BUNDLE_SIZE, parse_bundle
from verifier.errors import FormatError, VerificationError
from verifier.logsource import FetchError, LogSource, open_log
from verifier.monitor import (
    AlertSink,
    Monitor,
    PollResult,
    Rebuild,
    WatchRules,
    lock_state,
)
from verifier.note import NoteVerifier
from verifier.verify import (
    ArtifactPublicKey,
    Expectations,
    VerificationResult,
    check_bundle,
    load_artifact_keys,
    load_log_key,
    sha256_file,
)

logger = logging.getLogger(__name__)

PROG = "verifier"
Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """The command line or a file it names cannot be used; exit status 2."""


def _version() -> str:
    try:
        return metadata.version("logsign")
    except metadata.PackageNotFoundError:
        return "unknown"


def _say(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr)


# --- Shared option handling --------------------------------------------------


def _log_key(text: str) -> NoteVerifier:
    try:
        return load_log_key(text)
    except (FormatError, OSError) as e:
        raise UsageError(f"--log-key: {e}") from e


def _artifact_keys(paths: Sequence[Path]) -> dict[str, ArtifactPublicKey]:
    try:
        return load_artifact_keys(paths)
    except (FormatError, OSError) as e:
        raise UsageError(f"--key: {e}") from e


def _open_log(location: str) -> LogSource:
    try:
        return open_log(location)
    except ValueError as e:
        raise UsageError(f"--log: {e}") from e


# --- verify ------------------------------------------------------------------


def _add_verify(commands: argparse._SubParsersAction[Any]) -> None:
    verify = commands.add_parser(
        "verify",
        help="verify an artifact against its signature bundle",
        description="Verify FILE against its .sigbundle: 1. the file's SHA-256 "
        "is the leaf's; 2. the signature verifies with a trusted key; 3. the "
        "checkpoint is signed by the trusted log key; 4. the leaf is included "
        "in that checkpoint; 5. the leaf meets the --expect-* options. Offline "
        "unless --online is given.",
    )
    verify.add_argument("file", type=Path, metavar="FILE", help="the artifact")
    verify.add_argument(
        "--bundle",
        type=Path,
        metavar="B",
        help="the signature bundle (default: FILE.sigbundle)",
    )
    verify.add_argument(
        "--log-key",
        required=True,
        metavar="VKEY",
        help="the log's verifier key, or a file holding it (log.vkey)",
    )
    verify.add_argument(
        "--key",
        action="append",
        type=Path,
        required=True,
        metavar="PEM",
        help="a trusted artifact public key (PEM); repeat for several",
    )
    verify.add_argument(
        "--online",
        action="store_true",
        help="also check the log's latest checkpoint is consistent with the "
        "bundle's and still holds the entry (needs --log)",
    )
    verify.add_argument("--log", metavar="URL", help="the log, for --online")
    for name, what in [
        ("identity", "identity subject"),
        ("issuer", "identity issuer"),
        ("repository", "source repository"),
        ("ref", "source ref"),
        ("builder", "builder"),
        ("rule", "policy rule"),
    ]:
        verify.add_argument(
            f"--expect-{name}",
            metavar="VALUE",
            help=f"require the leaf's {what} to equal VALUE",
        )
    verify.add_argument("--json", action="store_true", help="print a JSON result")
    verify.set_defaults(run=_verify)


def _verify(args: argparse.Namespace) -> int:
    if args.online and not args.log:
        raise UsageError("--online needs --log URL")
    if args.log and not args.online:
        raise UsageError("--log is only used with --online")
    log_key = _log_key(args.log_key)
    keys = _artifact_keys(args.key)
    bundle_path: Path = args.bundle or args.file.with_name(
        args.file.name + ".sigbundle"
    )
    try:
        digest = sha256_file(args.file)
        size = args.file.stat().st_size
        with bundle_path.open("rb") as f:
            bundle_data = f.read(MAX_BUNDLE_SIZE + 1)
    except OSError as e:
        raise UsageError(str(e)) from e
    expect = Expectations(
        identity=args.expect_identity,
        issuer=args.expect_issuer,
        repository=args.expect_repository,
        ref=args.expect_ref,
        builder=args.expect_builder,
        rule=args.expect_rule,
    )
    try:
        bundle = parse_bundle(bundle_data)
    except FormatError as e:
        result = VerificationResult(error=f"the bundle does not parse: {e}")
    else:
        log = _open_log(args.log) if args.online else None
        try:
            result = check_bundle(bundle, digest, log_key, keys, expect, log, size=size)
        except FetchError as e:
            result = VerificationResult(error=f"cannot read the log: {e}")
        finally:
            if log is not None:
                log.close()
    if args.json:
        body = {"file": str(args.file), "bundle": str(bundle_path)}
        body["sha256"] = digest.hex()
        print(json.dumps({**body, **result.to_json()}, indent=2))
    if not result.verified:
        step = result.failed_step
        where = f"step {step} ({_step_name(result)}): " if step else ""
        _say(f"FAILED {args.file}: {where}{result.error}")
        return 1
    if not args.json:
        print(_verified_line(args.file, result))
    return 0


def _step_name(result: VerificationResult) -> str:
    return next(name for name, state in result.steps.items() if state == "failed")


def _verified_line(path: Path, result: VerificationResult) -> str:
    assert result.bundle is not None
    leaf, checkpoint = result.bundle.leaf, result.bundle.checkpoint.checkpoint
    line = (
        f"verified {path}: entry {result.bundle.index} of {checkpoint.origin} "
        f"(tree size {checkpoint.size}), signed by key "
        f"{leaf.signature.key_id[:16]}… for {leaf.identity.subject!r}"
    )
    if result.online is not None:
        line += (
            f"; consistent with the log at size {result.online.latest.checkpoint.size}"
        )
    return line


# --- monitor -----------------------------------------------------------------


def _add_monitor(commands: argparse._SubParsersAction[Any]) -> None:
    monitor = commands.add_parser(
        "monitor",
        help="watch a log: checkpoints, consistency and every new entry",
        description="Poll the log's checkpoint, check its signature and its "
        "consistency with the last verified one (kept in --state), and check "
        "every new entry, read through tiles checked against that checkpoint. "
        "Alerts are JSON lines on stdout (and POSTed to --webhook).",
    )
    monitor.add_argument(
        "--log", required=True, metavar="URL", help="the log: URL or directory"
    )
    monitor.add_argument(
        "--log-key", required=True, metavar="VKEY", help="the log's verifier key"
    )
    monitor.add_argument(
        "--state",
        required=True,
        type=Path,
        metavar="DIR",
        help="where the last verified checkpoint and the next index are kept",
    )
    monitor.add_argument(
        "--watch",
        type=Path,
        metavar="RULES.toml",
        help="allowed issuers, subjects, key_ids, artifact_names and rules",
    )
    rebuild = monitor.add_mutually_exclusive_group()
    rebuild.add_argument(
        "--rebuild",
        type=Path,
        metavar="DIR",
        help="rebuilt artifacts: every signed name must be here, with its digest",
    )
    rebuild.add_argument(
        "--manifest",
        type=Path,
        metavar="FILE",
        help="rebuilt artifacts as '<sha256>  <name>' lines (sha256sum output)",
    )
    monitor.add_argument(
        "--key",
        action="append",
        type=Path,
        metavar="PEM",
        help="check every leaf's signature with these artifact keys",
    )
    monitor.add_argument("--webhook", metavar="URL", help="POST each alert here")
    monitor.add_argument(
        "--foreign",
        action="store_true",
        help="the leaves may not be in our format: count those, do not alert",
    )
    monitor.add_argument("--once", action="store_true", help="poll once and exit")
    monitor.add_argument(
        "--interval",
        type=float,
        default=60.0,
        metavar="S",
        help="seconds between polls (default: 60)",
    )
    monitor.set_defaults(run=_monitor)


def _monitor(args: argparse.Namespace) -> int:
    if args.interval <= 0:
        raise UsageError("--interval must be positive")
    log_key = _log_key(args.log_key)
    keys = _artifact_keys(args.key) if args.key else None
    try:
        rules = WatchRules.load(args.watch) if args.watch else None
        rebuild = None
        if args.rebuild is not None:
            rebuild = Rebuild.from_directory(args.rebuild)
        elif args.manifest is not None:
            rebuild = Rebuild.from_manifest(args.manifest)
        sink = AlertSink(sys.stdout, args.webhook)
        lock = lock_state(args.state)
    except (FormatError, OSError, ValueError) as e:
        raise UsageError(str(e)) from e
    log = _open_log(args.log)
    try:
        try:
            monitor = Monitor(
                log,
                log_key,
                args.state,
                sink,
                rules=rules,
                rebuild=rebuild,
                artifact_keys=keys,
                foreign=args.foreign,
            )
        except FormatError as e:
            _say(f"error: {e}")
            return 1
        return _monitor_loop(monitor, sink, args.once, args.interval)
    finally:
        log.close()
        lock.close()


def _monitor_loop(
    monitor: Monitor, sink: AlertSink, once: bool, interval: float
) -> int:
    """Poll until stopped (SIGINT or SIGTERM), or once.

    Exit status 1 if an alert was raised, or, with --once, if the log could
    not be read. Stopping mid-poll is safe: the state is saved atomically.
    """
    previous = None
    if not once and threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            began = time.monotonic()
            try:
                result = monitor.poll()
            except FetchError as e:
                _say(f"cannot read the log: {e}")
                if once:
                    return 1
            else:
                _say(_poll_line(monitor, result))
            if once:
                return 1 if sink.count else 0
            time.sleep(max(0.0, interval - (time.monotonic() - began)))
    except KeyboardInterrupt:
        return 1 if sink.count else 0
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def _poll_line(monitor: Monitor, result: PollResult) -> str:
    unparsed = f", {result.unparsed} not in our leaf format" if result.unparsed else ""
    return (
        f"monitor: {monitor.log_key.name} at size {result.tree_size}: "
        f"checked {result.checked} new entries, {result.alerts} alerts"
        f"{unparsed}; next index {monitor.state.next_index}"
    )


# --- audit -------------------------------------------------------------------


def _add_audit(commands: argparse._SubParsersAction[Any]) -> None:
    audit = commands.add_parser(
        "audit",
        help="recompute every tile and the root of a log from its entries",
        description="Check the checkpoint's signature, recompute every tile "
        "and the root from the entry bundles, compare them with the served "
        "tiles and the checkpoint, and check every leaf parses.",
    )
    audit.add_argument(
        "--log", required=True, metavar="URL|DIR", help="the log: URL or directory"
    )
    audit.add_argument(
        "--log-key", required=True, metavar="VKEY", help="the log's verifier key"
    )
    audit.add_argument(
        "--foreign",
        action="store_true",
        help="the leaves are not in our format: do not parse them",
    )
    audit.add_argument(
        "--jobs",
        type=int,
        metavar="N",
        help="worker processes (default: one per CPU)",
    )
    audit.add_argument(
        "--progress",
        action="store_true",
        help="report progress on stderr (the default when it is a terminal)",
    )
    audit.add_argument("--json", action="store_true", help="print a JSON report")
    audit.set_defaults(run=_audit)


def _audit(args: argparse.Namespace) -> int:
    if args.jobs is not None and args.jobs < 1:
        raise UsageError("--jobs must be at least 1")
    log_key = _log_key(args.log_key)
    location: str = args.log
    remote = location.startswith(("http://", "https://", "file:"))
    if not remote and not Path(location).is_dir():
        raise UsageError(f"--log: {location} is not a URL or a directory")
    show = args.progress or sys.stderr.isatty()
    try:
        report = audit_log(
            location,
            log_key,
            foreign=args.foreign,
            jobs=args.jobs,
            progress=_Progress(sys.stderr.isatty()) if show else None,
        )
    except FetchError as e:
        _say(f"cannot read the log: {e}")
        return 1
    except (FormatError, VerificationError) as e:
        _say(f"audit FAILED: the checkpoint does not verify: {e}")
        return 1
    if args.json:
        print(json.dumps(report.to_json(), indent=2))
    else:
        print(_audit_text(report, args.foreign))
    if not report.ok:
        first = report.problems[0]
        _say(f"audit FAILED: {report.problem_count} problems; first: {first}")
        return 1
    return 0


class _Progress:
    """Progress on stderr: rewritten in place on a terminal, else every 5 s."""

    def __init__(self, terminal: bool) -> None:
        self._terminal = terminal
        self._began = self._last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        period = 0.5 if self._terminal else 5.0
        if now - self._last < period and done < total:
            return
        self._last = now
        rate = done / max(now - self._began, 1e-9)
        line = f"{PROG}: audit: {done:,}/{total:,} entries ({rate:,.0f}/s)"
        if self._terminal:
            end = "\n" if done >= total else ""
            print("\r" + line, end=end, file=sys.stderr, flush=True)
        else:
            print(line, file=sys.stderr, flush=True)


def _audit_text(report: AuditReport, foreign: bool) -> str:
    tiles = ", ".join(f"level {lv}: {n}" for lv, n in sorted(report.tiles.items()))
    if foreign:
        leaves = "not parsed (--foreign)"
    else:
        leaves = f"{report.parsed:,} valid, {report.unparsed:,} invalid"
    rate = report.entries / max(report.seconds, 1e-9)
    lines = [
        f"audit of {report.origin} at size {report.tree_size:,}: "
        + ("OK" if report.ok else f"FAILED, {report.problem_count} problems"),
        f"  entries: {report.entries:,}",
        f"  tiles:   {tiles}",
        f"  leaves:  {leaves}",
        f"  time:    {report.seconds:.2f} s ({rate:,.0f} entries/s)",
    ]
    lines += [f"  problem: {p}" for p in report.problems]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Verify artifacts offline against their signature bundles, "
        "and monitor or audit a transparency log.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    parser.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=0,
        help="say more on stderr (-v: what is checked, -vv: debugging)",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in (_add_verify, _add_monitor, _add_audit):
        add(commands)
    return parser


class _FieldsFormatter(logging.Formatter):
    """`verifier: message key=value ...`, with the structured fields."""

    _standard = set(vars(logging.makeLogRecord({}))) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(
            f"{k}={v}" for k, v in vars(record).items() if k not in self._standard
        )
        text = f"{PROG}: {record.getMessage()}"
        return f"{text} {fields}" if fields else text


def _configure_logging(verbosity: int) -> None:
    level = {0: logging.WARNING, 1: logging.INFO}.get(verbosity, logging.DEBUG)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_FieldsFormatter())
    root = logging.getLogger("verifier")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version and usage errors
        return exc.code if isinstance(exc.code, int) else 2
    _configure_logging(args.verbose)
    run: Handler = args.run
    try:
        return run(args)
    except UsageError as e:
        _say(f"error: {e}")
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
