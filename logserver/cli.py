"""`logserver`: run the log server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import ssl
import sys
from collections.abc import Coroutine
from importlib.metadata import version
from pathlib import Path
from typing import Any

from aiohttp import web

from logserver import logs
from logserver.app import STATE, create_app
from logserver.auth import TokensFileError, load_tokens_file
from logserver.config import Config, ConfigError, load_config
from logserver.policy import PolicyError, load_policy
from logserver.storage import StorageError
from signer.keys import SignerError

logger = logging.getLogger("logserver")

# Seconds a stopping server gives requests in flight (SPEC 5.4).
DRAIN_SECONDS = 10.0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="logserver",
        description="A transparency-log signing service: signs artifact digests "
        "and appends every signature to a C2SP tiled Merkle log.",
    )
    parser.add_argument("--version", action="version", version=version("logsign"))
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser(
        "serve",
        help="run the log server",
        description="Run the log server. With no options it keeps everything in "
        "./data: an SQLite database, software keys (for development only), the "
        "public keys in data/public/ and a submit token in data/secrets/.",
    )
    serve.add_argument("--data", type=Path, help="data directory (default: ./data)")
    serve.add_argument(
        "--listen",
        metavar="HOST:PORT",
        help="address to listen on (default: 127.0.0.1:8080)",
    )
    serve.add_argument(
        "--database",
        metavar="URL",
        help="sqlite:///PATH or postgresql://USER@HOST/DB (default: DATA/log.db)",
    )
    serve.add_argument("--config", type=Path, metavar="FILE", help="TOML configuration")
    serve.add_argument(
        "--origin",
        help="checkpoint origin, fixed at first start (default: HOSTNAME/log)",
    )
    serve.add_argument(
        "--log-format", choices=["text", "json"], help="log as text or JSON lines"
    )
    serve.add_argument(
        "--policy",
        type=Path,
        metavar="FILE",
        help="policy TOML (default: the bootstrap token may sign anything)",
    )
    serve.add_argument(
        "--tls-cert",
        type=Path,
        metavar="FILE",
        help="serve HTTPS with this PEM certificate chain (needs --tls-key)",
    )
    serve.add_argument(
        "--tls-key",
        type=Path,
        metavar="FILE",
        help="the certificate's PEM private key, unencrypted",
    )
    serve.add_argument("-v", "--verbose", action="count", default=0, help="more logs")

    policy = commands.add_parser(
        "policy",
        help="work with policy files",
        description="Check policy files and explain their decisions.",
    )
    policy_actions = policy.add_subparsers(
        dest="action", required=True, metavar="ACTION"
    )
    check = policy_actions.add_parser(
        "check",
        help="lint a policy file and explain a decision",
        description="Parse and lint a policy file. With --issuer/--subject (or "
        "--request), also say which rule would decide such a request and why. "
        "Exit status: 0 valid (and allowed), 1 invalid policy or denied request.",
    )
    check.add_argument("file", type=Path, metavar="FILE", help="the policy file")
    check.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="server configuration, to check key names",
    )
    check.add_argument(
        "--issuer", help="the caller's issuer (default: logserver/token)"
    )
    check.add_argument("--subject", help="the caller's subject, such as a token name")
    check.add_argument(
        "--claim",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an identity claim, such as repository_id=123 (repeatable)",
    )
    check.add_argument(
        "--request",
        type=Path,
        metavar="FILE",
        help="a JSON request body as POST /api/v1/entries takes it",
    )
    check.add_argument("--artifact", metavar="NAME", help="artifact name to ask about")
    check.add_argument("--key", metavar="NAME", help="artifact key to ask about")
    check.add_argument("--commit", help="source commit of the request")
    check.add_argument("--json", action="store_true", help="print JSON")
    check.set_defaults(run=_policy_check)

    token = commands.add_parser(
        "token",
        help="manage bearer tokens",
        description="Create bearer tokens for the tokens file.",
    )
    token_actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = token_actions.add_parser(
        "create",
        help="make a new token",
        description="Print a new token on stdout (it is shown only this once) "
        "and, on stderr, the line to add to the tokens file. The file keeps "
        "only the token's SHA-256; send the server SIGHUP after editing it.",
    )
    create.add_argument("name", help="the identity the token stands for (its subject)")
    create.add_argument(
        "--append",
        type=Path,
        metavar="FILE",
        help="also append the line to this tokens file",
    )
    create.set_defaults(run=_token_create)
    return parser


def _policy_check(args: argparse.Namespace) -> int:
    from logserver import policytool

    return policytool.check(args)


def _token_create(args: argparse.Namespace) -> int:
    from logserver import policytool

    return policytool.create_token(args)


def _banner(app: web.Application, url: str) -> str:
    state = app[STATE]
    public = state.config.data / "public"
    keys = ", ".join(str(public / f"{name}.pem") for name in state.keys.artifact)
    return (
        f"logserver: serving log {state.sequencer.origin!r} at {url}\n"
        f"  checkpoint verifier key: {state.keys.verifier_key}\n"
        f"    (also in {public / 'log.vkey'})\n"
        f"  artifact signing keys: {keys}\n"
        f"  submit token: {state.token_path} (send as 'Authorization: Bearer ...')\n"
        f"  admin token (audit): {state.admin_token_path}\n"
        f"  policy: {state.config.policy or 'built-in (bootstrap token only)'}"
        f" sha256 {state.governance.policy.sha256}\n"
        f"  database: {state.config.database_url().split('@')[-1]}\n"
    )


def tls_context(config: Config) -> ssl.SSLContext | None:
    """The server's TLS context, or None to serve plain HTTP.

    TLS 1.2 at least, with the ssl module's default server ciphers; the key
    must not be encrypted (there is no one to type a passphrase).
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(config.tls_cert, config.tls_key, password=_no_password)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {config.tls_cert} and key "
            f"{config.tls_key}: {exc}"
        ) from exc
    return context


def _no_password() -> str:
    # Called only for an encrypted key: refuse instead of prompting on a tty.
    raise ssl.SSLError("the TLS key is encrypted; give an unencrypted PEM key")


async def serve(config: Config, tls: ssl.SSLContext | None = None) -> None:
    app = create_app(config)
    runner = web.AppRunner(
        app,
        access_log=logging.getLogger("aiohttp.access"),
        # Closes a connection that sends no complete request head within
        # this long of opening or of its last answer: idle keep-alive
        # connections and slow senders of headers alike.
        keepalive_timeout=config.idle_timeout_seconds,
        # On SIGTERM, requests in flight get this long to be answered.
        shutdown_timeout=DRAIN_SECONDS,
    )
    await runner.setup()
    try:
        host, port = config.listen_address()
        site = web.TCPSite(
            runner, host, port, backlog=1024, reuse_address=True, ssl_context=tls
        )
        await site.start()
        # Everything loaded at start (modules, schemas, keys, the policy) is
        # kept for the life of the process: take it out of the cyclic
        # collector's full passes, which otherwise walk it again and again.
        gc.freeze()
        bound = runner.addresses[0]
        scheme = "https" if tls is not None else "http"
        url = config.public_url or f"{scheme}://{host}:{bound[1]}/"
        sys.stdout.write(_banner(app, url))
        sys.stdout.flush()

        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
        logger.info("stopping: draining submissions in flight")
    finally:
        await runner.cleanup()


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)
    else:
        uvloop.run(main)


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "serve":
        code: int = args.run(args)
        return code
    try:
        config = load_config(
            args.config,
            data=args.data,
            listen=args.listen,
            database=args.database,
            origin=args.origin,
            log_format=args.log_format,
            policy=args.policy,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
    except ConfigError as exc:
        print(f"logserver: {exc}", file=sys.stderr)
        return 2
    try:
        # Refuse a broken policy or tokens file before opening anything.
        if config.policy is not None:
            load_policy(config.policy)
        if config.tokens is not None:
            load_tokens_file(config.tokens)
    except (PolicyError, TokensFileError) as exc:
        print(f"logserver: {exc}", file=sys.stderr)
        return 2
    try:
        tls = tls_context(config)
    except ConfigError as exc:
        print(f"logserver: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_format, args.verbose)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            _run(serve(config, tls))
    except (ConfigError, StorageError, SignerError, OSError) as exc:
        print(f"logserver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
