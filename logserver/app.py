"""The aiohttp application: its state, its lifecycle and its middlewares."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from logserver.audit import AuditLog
from logserver.auth import (
    ADMIN_SUBJECT,
    Authenticator,
    TokenAuthenticator,
    TokensFileError,
    load_or_create_token,
)
from logserver.config import Config, ConfigError
from logserver.errors import ApiError, NotFound, PayloadTooLarge, RequestTimeout
from logserver.governance import Governance
from logserver.keys import LogKeys, open_keys, publish_keys
from logserver.metrics import Metrics
from logserver.oidc import OidcVerifier
from logserver.policy import PolicyError
from logserver.sequencer import Sequencer
from logserver.storage import Storage, StorageUnavailable, open_storage

logger = logging.getLogger(__name__)


@dataclass
class LogState:
    """Everything a request handler needs, opened and closed with the app."""

    config: Config
    metrics: Metrics
    storage: Storage
    keys: LogKeys
    sequencer: Sequencer
    governance: Governance
    admin: TokenAuthenticator
    token_path: Path
    admin_token_path: Path
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
    except ApiError as exc:
        headers = {}
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return error_response(exc.status, exc.code, exc.message, exc.details, **headers)
    except StorageUnavailable as exc:
        # A read while the database is down (the write path maps its own).
        logger.warning(
            "database unavailable", extra={"path": request.path, "error": str(exc)}
        )
        return error_response(
            503,
            "unavailable",
            "the database is unavailable; retry shortly",
            **{"Retry-After": "2"},
        )
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
async def body_timeout_middleware(
    request: web.Request,
    handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
) -> web.StreamResponse:
    """Answer 408 when a body is still arriving `body_timeout_seconds` after
    the request head, so a client that trickles its body (or stops sending
    it) cannot hold a handler for ever. The head itself is bounded by the
    idle timeout (cli.py). A body that has arrived, read or not, is exempt,
    and so is the time a handler then spends waiting for the log.
    """
    content = request.content
    if content.is_eof():
        return await handler(request)
    limit = request.app[CONFIG].body_timeout_seconds
    error = RequestTimeout(f"the request body did not arrive within {limit:g} seconds")

    def expire() -> None:
        if not content.is_eof():
            content.set_exception(error)

    timer = asyncio.get_running_loop().call_later(limit, expire)
    try:
        return await handler(request)
    except RequestTimeout as exc:
        if exc is not error:
            raise
        logger.info(
            "request body timed out",
            extra={"path": request.path, "seconds": limit},
        )
        response = error_response(exc.status, exc.code, exc.message)
        # The rest of the body may still be on its way: do not wait for it.
        response.force_close()
        return response
    finally:
        timer.cancel()


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


@contextlib.asynccontextmanager
async def _http_session(config: Config) -> AsyncIterator[aiohttp.ClientSession | None]:
    """A client session for fetching JWKS, if any issuer publishes one by URL."""
    if not any(i.jwks_url for i in config.oidc.issuers):
        yield None
        return
    async with aiohttp.ClientSession() as session:
        yield session


@contextlib.contextmanager
def _reload_on_sighup(governance: Governance) -> Iterator[None]:
    """SIGHUP reloads the policy and tokens files while requests go on."""
    loop = asyncio.get_running_loop()
    tasks: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        logger.info("SIGHUP: reloading the policy")
        task = loop.create_task(governance.reload())
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    try:
        loop.add_signal_handler(signal.SIGHUP, reload)
    except (NotImplementedError, RuntimeError, ValueError):
        # Not the main thread, or no signals on this platform.
        logger.warning("cannot handle SIGHUP here; policy reload is off")
        yield
        return
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = Metrics()
    storage = open_storage(config.database_url())
    await storage.open()
    try:
        origin = await _origin(config, storage)
        keys = await open_keys(config, origin, storage)
        metrics.watch_signers(
            lambda: [
                *(("artifact", name, s) for name, s in keys.artifact.items()),
                ("checkpoint", keys.checkpoint.name, keys.checkpoint),
            ]
        )
        try:
            publish_keys(keys, config.data / "public")
            secrets_dir = config.data / "secrets"
            token_path = secrets_dir / "submit.token"
            admin_token_path = secrets_dir / "admin.token"
            admin = TokenAuthenticator()
            admin.add_token(load_or_create_token(admin_token_path), ADMIN_SUBJECT)
            sequencer = Sequencer(
                storage,
                keys.checkpoint,
                metrics=metrics,
                max_batch=config.sequencer.max_batch,
                linger=config.sequencer.linger_ms / 1000,
                max_pending=config.sequencer.max_pending,
            )
            audit = AuditLog(storage)
            async with _http_session(config) as session:
                oidc = (
                    OidcVerifier(config.oidc, session) if config.oidc.issuers else None
                )
                governance = Governance(
                    storage=storage,
                    keys=keys,
                    sequencer=sequencer,
                    metrics=metrics,
                    audit=audit,
                    authenticator=Authenticator(TokenAuthenticator(), oidc),
                    bootstrap_token=load_or_create_token(token_path),
                    policy_path=config.policy,
                    tokens_path=config.tokens,
                )
                try:
                    governance.load()
                except (PolicyError, TokensFileError) as exc:
                    raise ConfigError(str(exc)) from exc
                await sequencer.start()
                await audit.start()
                app[STATE] = LogState(
                    config,
                    metrics,
                    storage,
                    keys,
                    sequencer,
                    governance,
                    admin,
                    token_path,
                    admin_token_path,
                )
                try:
                    with _reload_on_sighup(governance):
                        yield
                finally:
                    await sequencer.stop()
                    await audit.stop()
        finally:
            await keys.aclose()
    finally:
        await storage.close()


def create_app(config: Config) -> web.Application:
    """The application factory: routes, middlewares and lifecycle."""
    from logserver import api_governance, api_read, api_write, openapi

    app = web.Application(
        client_max_size=config.max_body_bytes,
        middlewares=[metrics_middleware, errors_middleware, body_timeout_middleware],
    )
    app[CONFIG] = config
    app.cleanup_ctx.append(_lifecycle)
    api_write.add_routes(app)
    api_read.add_routes(app)
    api_governance.add_routes(app)
    openapi.add_routes(app)
    return app
