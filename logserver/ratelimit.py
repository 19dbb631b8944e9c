"""Per-identity rate limits: a token bucket for each caller.

Each identity (issuer and subject) may make `burst` requests at once and
then `per_second` on average. A request over the limit is refused with 429
and a `Retry-After` of the seconds until a token is back.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from logserver.errors import TooManyRequests

# Buckets that are full again are forgotten once this many are held.
_MAX_BUCKETS = 10_000


class RateLimiter:
    def __init__(
        self,
        per_second: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if per_second <= 0 or burst < 1:
            raise ValueError("the rate must be positive and the burst at least 1")
        self.per_second = per_second
        self.burst = burst
        self._clock = clock
        self._buckets: dict[tuple[str, str], tuple[float, float]] = {}

    def check(self, key: tuple[str, str]) -> None:
        """Take a token for `key`, or raise `TooManyRequests`."""
        now = self._clock()
        tokens, last = self._buckets.get(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + (now - last) * self.per_second)
        if tokens < 1:
            wait = math.ceil((1 - tokens) / self.per_second)
            self._buckets[key] = (tokens, now)
            raise TooManyRequests(
                f"{key[0]} {key[1]!r} is over its rate limit of "
                f"{self.per_second * 60:g} requests a minute; retry in {wait} s",
                retry_after=max(wait, 1),
            )
        self._buckets[key] = (tokens - 1, now)
        if len(self._buckets) > _MAX_BUCKETS:
            self._forget_full(now)

    def _forget_full(self, now: float) -> None:
        for key, (tokens, last) in list(self._buckets.items()):
            if tokens + (now - last) * self.per_second >= self.burst:
                del self._buckets[key]
