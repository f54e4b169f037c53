"""The worker's outbox: while Redis is away writes are kept in order (bounded, progress dropped first, one copy
of the job state) without touching Redis on every write; once it answers they go out in the same order."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import redis

from app.redis_client import connect
from config.settings import RedisSettings
from worker.cli.redis_embedded import free_port
from worker.outbox import RedisOutbox, Write


@pytest.fixture
def nowhere() -> Iterator[redis.Redis]:
    client = connect(f"redis://127.0.0.1:{free_port()}/0", RedisSettings())
    yield client
    client.close()


def _event(name: str, droppable: bool = False) -> Write:
    return Write("publish", "digits:events", name.encode(), droppable=droppable)


def test_kept_in_order_bounded_then_written_when_redis_answers(nowhere: redis.Redis, redis_url: str) -> None:
    outbox = RedisOutbox(nowhere, capacity=5)
    started = time.monotonic()
    assert not outbox.send(_event("started"))
    for i in range(4):
        outbox.send(_event(f"progress-{i}", droppable=True))
        outbox.send(Write("hset", "rq:job:j", f"meta-{i}".encode(), field="meta"))
    outbox.send(_event("completed"))
    assert time.monotonic() - started < 2.0, "a dead Redis is not tried on every write"
    # Five kept: the oldest progress went first, the job state kept once (its newest copy).
    assert [w.payload for w in outbox.pending] == [b"started", b"progress-2", b"progress-3", b"meta-3", b"completed"]
    assert outbox.dropped == 2  # progress-0 and progress-1; replaced state copies are not losses

    live = redis.Redis.from_url(redis_url)
    pubsub = redis.client.PubSub(live.connection_pool, ignore_subscribe_messages=True)
    pubsub.subscribe("digits:events")
    outbox.connection = live
    assert outbox.flush(wait_s=5.0) and not outbox.pending
    heard: list[bytes] = []
    deadline = time.monotonic() + 3.0
    while len(heard) < 4 and time.monotonic() < deadline:
        message = pubsub.get_message(timeout=0.2)
        if message is not None and message["type"] == "message":
            heard.append(message["data"])
    assert heard == [b"started", b"progress-2", b"progress-3", b"completed"]
    assert live.hget("rq:job:j", "meta") == b"meta-3"
    pubsub.close()
    live.close()


def test_flush_gives_up_after_its_wait(nowhere: redis.Redis) -> None:
    outbox = RedisOutbox(nowhere)
    outbox.send(_event("completed"))
    started = time.monotonic()
    assert not outbox.flush(wait_s=1.0)
    assert 0.9 <= time.monotonic() - started < 5.0 and len(outbox.pending) == 1
