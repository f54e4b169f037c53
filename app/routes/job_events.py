"""`GET /v1/jobs/{job_id}/events`: a job's public state as Server-Sent Events, until the job ends.

The first event is the state now; another follows each time it changes; the stream closes after the
event that says `finished` or `failed`. The worker's events on the pub/sub channel say *when* to look,
and the state itself is read from the job in Redis: pub/sub is at-most-once, so the stream also looks
every `_POLL_S` seconds, and a lost subscription (Redis restarted, connection killed) is re-made with
backoff while the stream stays open. Works with `curl -N` and the browser's `EventSource`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Final

import redis
import redis.asyncio as aioredis
from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import ValidationError
from redis.exceptions import RedisError

from app.contracts import parse_event
from app.deps import RedisDep, SettingsDep
from app.public_job import PublicJobView, public_view
from app.queue import TrainingUnavailableError, read_job, require_connection
from app.routes.jobs import find_job

router = APIRouter(tags=["training"])

_POLL_S: Final = 2.0  # look at the job at least this often, whatever pub/sub says
_KEEPALIVE_S: Final = 15.0  # a comment line so proxies keep an idle stream open
_BACKOFF_MAX_S: Final = 10.0

_SSE_DOC: Final[dict[int | str, dict[str, object]]] = {
    200: {
        "description": "`text/event-stream`: `event: state` with a PublicJobView as `data`, "
        "first the state now, then each change; the stream ends after a `finished` or `failed` state.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    404: {"description": "no such job"},
    503: {"description": "training not configured or Redis unreachable"},
}


def sse_event(state: PublicJobView, event_id: int) -> str:
    return f"id: {event_id}\nevent: state\ndata: {state.model_dump_json()}\n\n"


class _Wakeups:
    """A subscription to the events channel that wakes the stream when an event names its job."""

    def __init__(self, redis_url: str, channel: str, job_id: str) -> None:
        self._url, self._channel, self._job_id = redis_url, channel, job_id
        self._client: aioredis.Redis | None = None
        self._pubsub: aioredis.client.PubSub | None = None
        self._backoff = 0.5

    async def wait(self, timeout: float) -> None:
        """Returns when an event for the job arrives, or after `timeout` seconds (also while Redis is away)."""
        deadline = time.monotonic() + timeout
        try:
            pubsub = await self._subscribed()
            while (left := deadline - time.monotonic()) > 0:
                message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=left)
                if message is not None and message.get("type") == "message" and self._names_job(message.get("data")):
                    return
        except (RedisError, OSError):
            await self.close()
            await asyncio.sleep(max(0.0, min(self._backoff, deadline - time.monotonic())))
            self._backoff = min(self._backoff * 2, _BACKOFF_MAX_S)

    async def _subscribed(self) -> aioredis.client.PubSub:
        if self._pubsub is None:
            self._client = aioredis.Redis.from_url(self._url, socket_connect_timeout=2.0, health_check_interval=15)
            self._pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            await self._pubsub.subscribe(self._channel)
            self._backoff = 0.5
        return self._pubsub

    def _names_job(self, data: object) -> bool:
        if not isinstance(data, bytes):
            return False
        try:
            return parse_event(data).job_id == self._job_id
        except (ValidationError, ValueError):
            return False

    async def close(self) -> None:
        client, self._client, self._pubsub = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()  # closes the pool's connections, the subscription's included


async def _look(connection: redis.Redis, queue_name: str, job_id: str, last: PublicJobView) -> PublicJobView | None:
    """The job's public state now; `last` while Redis is away; None once the job has expired."""
    try:
        view = await asyncio.to_thread(read_job, connection, queue_name, job_id)
    except TrainingUnavailableError:
        return last
    return None if view is None else public_view(view)


async def _states(
    connection: redis.Redis, redis_url: str, channel: str, queue_name: str, first: PublicJobView
) -> AsyncIterator[str]:
    sent, event_id = first, 1
    yield sse_event(first, event_id)
    if first.ended:
        return
    wakeups = _Wakeups(redis_url, channel, first.job_id)
    last_write = time.monotonic()
    try:
        while True:
            await wakeups.wait(_POLL_S)
            view = await _look(connection, queue_name, first.job_id, sent)
            if view is None:
                return  # expired meanwhile: nothing more will happen
            if view != sent:
                sent, event_id = view, event_id + 1
                last_write = time.monotonic()
                yield sse_event(view, event_id)
                if view.ended:
                    return
            elif time.monotonic() - last_write >= _KEEPALIVE_S:
                last_write = time.monotonic()
                yield ": keep-alive\n\n"
    finally:
        await wakeups.close()


@router.get("/v1/jobs/{job_id}/events", response_class=StreamingResponse, responses=_SSE_DOC)
async def job_events(job_id: str, connection: RedisDep, settings: SettingsDep) -> StreamingResponse:
    """The job's public state (as `GET /v1/jobs/{id}` shows it without the key) as Server-Sent Events."""
    connection = require_connection(None if settings.redis_url is None else connection)
    first = public_view(await asyncio.to_thread(find_job, connection, settings.rq.queue, job_id))
    assert settings.redis_url is not None  # require_connection refused otherwise
    return StreamingResponse(
        _states(connection, settings.redis_url, settings.digits_events_channel, settings.rq.queue, first),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
