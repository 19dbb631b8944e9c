"""Errors the service answers with; the HTTP layer maps each to one status."""

from __future__ import annotations

from typing import Any


class ApiError(Exception):
    """An error a client caused or can act on, answered as a JSON body."""

    status = 400
    code = "bad_request"
    # Seconds the client should wait before retrying; sent as Retry-After.
    retry_after: int | None = None

    def __init__(self, message: str, *, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details


class BadRequest(ApiError):
    status, code = 400, "bad_request"


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    """The policy denied the request; `details` lists the reasons."""

    status, code = 403, "denied"


class NotFound(ApiError):
    status, code = 404, "not_found"


class RequestTimeout(ApiError):
    """The request body did not arrive in time (a slow or stalled client)."""

    status, code = 408, "request_timeout"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(ApiError):
    status, code = 415, "unsupported_media_type"


class Conflict(ApiError):
    """The request is in a state that does not allow this action."""

    status, code = 409, "conflict"


class Unprocessable(ApiError):
    status, code = 422, "invalid_request"


class TooManyRequests(ApiError):
    """The caller is over its rate limit; retry after `retry_after` seconds."""

    status, code = 429, "rate_limited"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ApiError):
    """Overload or an outage: the client should retry after `retry_after` seconds."""

    status, code = 503, "unavailable"

    def __init__(self, message: str, *, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after
