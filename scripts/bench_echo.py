#!/usr/bin/env python3
"""The ceiling for `scripts/bench`: a bare aiohttp JSON POST echo server.

One process, uvloop and orjson, no middlewares and no access log: the most a
single-process aiohttp server on this machine can answer. It parses the JSON
body and sends it back, so the work per request is the HTTP round trip plus
one JSON decode and encode.

    python3 scripts/bench_echo.py --listen 127.0.0.1:PORT

Prints "ready" on stdout once listening; SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import orjson
from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    if request.content_type != "application/json":
        return web.Response(status=415, text="application/json only")
    try:
        body = orjson.loads(await request.read())
    except orjson.JSONDecodeError:
        return web.Response(status=400, text="bad JSON")
    return web.Response(
        body=orjson.dumps(body), status=201, content_type="application/json"
    )


async def healthz(request: web.Request) -> web.Response:
    return web.Response(body=b'{"status":"ok"}', content_type="application/json")


async def serve(host: str, port: int) -> None:
    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/echo", echo)
    app.router.add_get("/healthz", healthz)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024, reuse_address=True)
    await site.start()
    sys.stdout.write(f"ready {host}:{runner.addresses[0][1]}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--listen", default="127.0.0.1:0", metavar="HOST:PORT")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    if host != "127.0.0.1":
        parser.error("the echo server only listens on 127.0.0.1")
    try:
        import uvloop

        uvloop.run(serve(host, int(port)))
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(serve(host, int(port)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
