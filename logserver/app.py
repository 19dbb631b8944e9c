"""The aiohttp application: its state, its lifecycle and its middlewares."""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from logserver.auth import TokenAuthenticator, load_or_create_token
from logserver.config import Config, ConfigError
from logserver.errors import ApiError, NotFound, PayloadTooLarge, Unavailable
from logserver.keys import LogKeys, open_keys, publish_keys
from logserver.leaves import PolicyDecision
from logserver.metrics import Metrics
from logserver.sequencer import Sequencer
from logserver.storage import Storage, open_storage

logger = logging.getLogger(__name__)

# Until the policy file exists, every valid token may sign with any key; the
# leaf records this built-in rule and the digest of its text.
BUILTIN_POLICY = b"# built-in: any valid bootstrap token may sign any artifact\n"


@dataclass
class LogState:
    """Everything a request handler needs, opened and closed with the app."""

    config: Config
    metrics: Metrics
    storage: Storage
    keys: LogKeys
    sequencer: Sequencer
    auth: TokenAuthenticator
    decision: PolicyDecision
    token_path: Path
    started: float = field(default_factory=time.monotonic)


STATE = web.AppKey("state", LogState)
CONFIG = web.AppKey("config", Config)


def json_response(
    body: Any, *, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def error_response(
    status: int, code: str, message: str, details: Any = None, **headers: str
) -> web.Response:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return json_response({"error": error}, status=status, headers=headers or None)


# aiohttp raises these itself (unknown route, body over the size limit); give
# them the same codes as the service's own errors.
_HTTP_CODES = {
    404: NotFound.code,
    405: "method_not_allowed",
    413: PayloadTooLarge.code,
}


@web.middleware
async def errors_middleware(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Turn every error into one JSON body and status, in one place."""
    try:
        return await handler(request)
    except Unavailable as exc:
        return error_response(
            exc.status, exc.code, exc.message, **{"Retry-After": str(exc.retry_after)}
        )
    except ApiError as exc:
        return error_response(exc.status, exc.code, exc.message, exc.details)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        code = _HTTP_CODES.get(exc.status, exc.reason.lower().replace(" ", "_"))
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else {}
        return error_response(exc.status, code, exc.text or exc.reason, **headers)
    except Exception:
        logger.exception("unhandled error", extra={"path": request.path})
        return error_response(500, "internal_error", "internal error; see server log")


@web.middleware
async def metrics_middleware(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    began = time.perf_counter()
    response = await handler(request)
    route = request.match_info.route.resource
    name = route.canonical if route is not None else "unmatched"
    request.app[STATE].metrics.requests.labels(
        name, request.method, str(response.status)
    ).observe(time.perf_counter() - began)
    return response


async def _origin(config: Config, storage: Storage) -> str:
    """The origin fixed at first start; a different configured one is an error."""
    stored = await storage.get_meta("origin")
    wanted = config.origin or stored or f"{socket.gethostname()}/log"
    if stored is not None and stored != wanted:
        raise ConfigError(
            f"this log's origin is {stored!r}; the configuration says {wanted!r}. "
            "The origin is fixed for the life of a log."
        )
    return await storage.set_meta_once("origin", wanted)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = Metrics()
    storage = open_storage(config.database_url())
    await storage.open()
    try:
        origin = await _origin(config, storage)
        keys = await open_keys(config, origin, storage)
        try:
            publish_keys(keys, config.data / "public")
            token_path = config.data / "secrets" / "submit.token"
            auth = TokenAuthenticator()
            auth.add_token(load_or_create_token(token_path), "bootstrap")
            sequencer = Sequencer(
                storage,
                keys.checkpoint,
                metrics=metrics,
                max_batch=config.sequencer.max_batch,
                linger=config.sequencer.linger_ms / 1000,
                max_pending=config.sequencer.max_pending,
            )
            await sequencer.start()
            decision = PolicyDecision(
                "builtin-bootstrap-token", hashlib.sha256(BUILTIN_POLICY).hexdigest()
            )
            app[STATE] = LogState(
                config, metrics, storage, keys, sequencer, auth, decision, token_path
            )
            try:
                yield
            finally:
                await sequencer.stop()
        finally:
            await keys.aclose()
    finally:
        await storage.close()


def create_app(config: Config) -> web.Application:
    """The application factory: routes, middlewares and lifecycle."""
    from logserver import api_read, api_write, openapi

    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[metrics_middleware, errors_middleware],
    )
    app[CONFIG] = config
    app.cleanup_ctx.append(_lifecycle)
    api_write.add_routes(app)
    api_read.add_routes(app)
    openapi.add_routes(app)
    return app
