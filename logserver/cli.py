"""`logserver`: run the log server."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Coroutine
from importlib.metadata import version
from pathlib import Path
from typing import Any

from aiohttp import web

from logserver import logs
from logserver.app import STATE, create_app
from logserver.config import Config, ConfigError, load_config
from logserver.storage import StorageError
from signer.keys import SignerError

logger = logging.getLogger("logserver")


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
    serve.add_argument("-v", "--verbose", action="count", default=0, help="more logs")
    return parser


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
        f"  database: {state.config.database_url().split('@')[-1]}\n"
    )


async def serve(config: Config) -> None:
    app = create_app(config)
    runner = web.AppRunner(app, access_log=logging.getLogger("aiohttp.access"))
    await runner.setup()
    try:
        host, port = config.listen_address()
        site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
        await site.start()
        bound = runner.addresses[0]
        url = config.public_url or f"http://{host}:{bound[1]}/"
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
    try:
        config = load_config(
            args.config,
            data=args.data,
            listen=args.listen,
            database=args.database,
            origin=args.origin,
            log_format=args.log_format,
        )
    except ConfigError as exc:
        print(f"logserver: {exc}", file=sys.stderr)
        return 2
    logs.configure(config.log_format, args.verbose)
    try:
        with contextlib.suppress(KeyboardInterrupt):
            _run(serve(config))
    except (ConfigError, StorageError, SignerError, OSError) as exc:
        print(f"logserver: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
