"""Every Redis connection of the system is made here, with the timeouts of `REDIS__*`.

Bounded timeouts and a short retry: a stopped Redis fails a command in well under a second, a hanging
one in `REDIS__SOCKET_TIMEOUT_S` (times the retries); nothing waits forever. The one retry reconnects a
pooled connection that a Redis restart left dead.
"""

from __future__ import annotations

from typing import Final

import redis
import redis.asyncio as aioredis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from config.settings import RedisSettings

RETRIES: Final = 1
HEALTH_CHECK_S: Final = 30


def connect(url: str, settings: RedisSettings, *, socket_timeout_s: float | None = None) -> redis.Redis:
    """A client with bytes replies (as RQ expects)."""
    return redis.Redis.from_url(
        url, socket_connect_timeout=settings.connect_timeout_s,
        socket_timeout=socket_timeout_s or settings.socket_timeout_s, health_check_interval=HEALTH_CHECK_S,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
    )


def connect_async(url: str, settings: RedisSettings) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url, socket_connect_timeout=settings.connect_timeout_s, socket_timeout=settings.socket_timeout_s,
        health_check_interval=HEALTH_CHECK_S, retry=AsyncRetry(ExponentialBackoff(cap=0.5, base=0.05), RETRIES),
    )
