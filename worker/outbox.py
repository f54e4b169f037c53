"""Writes to Redis that must land, in order, even across an outage: a job's events and its recorded state.

While Redis answers, every write goes out at once. When a write fails, it and every later one are kept
in order (bounded) and training goes on without touching Redis again until a retry is due, so a dead or
hanging Redis costs training one timeout per retry, not one per event. The next write after the retry
time, or `flush`, sends what was kept. The job's state (`job.meta`) is one value: only its newest copy
is kept. Past the bound, the oldest droppable writes (progress) go first; a final event is never dropped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal

import redis

log = logging.getLogger(__name__)

FIRST_RETRY_S: Final = 1.0
MAX_RETRY_S: Final = 15.0  # while training: one failed attempt (at worst a socket timeout) per this long
FLUSH_POLL_S: Final = 0.5  # while waiting for Redis with nothing else to do


@dataclass(frozen=True)
class Write:
    """One Redis write: PUBLISH channel payload, or HSET key field payload."""

    command: Literal["publish", "hset"]
    key: str
    payload: bytes
    field: str = ""
    droppable: bool = False  # progress: a newer one says the same, so it may go when the buffer is full


class RedisOutbox:
    def __init__(
        self,
        connection: redis.Redis | None,
        *,
        capacity: int = 2000,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.connection = connection
        self.capacity = capacity
        self.pending: deque[Write] = deque()
        self.dropped = 0
        self._clock = clock
        self._sleep = sleep
        self._retry_at = 0.0
        self._retry_s = FIRST_RETRY_S

    @property
    def down(self) -> bool:
        return bool(self.pending)

    def send(self, write: Write) -> bool:
        """Queue `write` behind any kept writes and send what Redis takes now. True when all went out."""
        if self.connection is None:
            return False
        if write.command == "hset" and not write.droppable:
            # State is one value per (key, field): a newer copy replaces the kept one, at the back.
            self.pending = deque(w for w in self.pending if not (w.command == "hset" and w.key == write.key
                                                                and w.field == write.field))
        self.pending.append(write)
        self._bound()
        if self._clock() < self._retry_at:
            return False
        return self._drain()

    def flush(self, wait_s: float) -> bool:
        """Send every kept write, retrying for up to `wait_s` seconds while Redis is away. True when all went."""
        if self.connection is None:
            return not self.pending
        deadline = self._clock() + wait_s
        while True:
            if self._drain():
                return True
            now = self._clock()
            if now >= deadline:
                log.error("Redis still unreachable after %.0fs: %d writes not recorded", wait_s, len(self.pending))
                return False
            self._sleep(min(FLUSH_POLL_S, deadline - now))

    def _drain(self) -> bool:
        assert self.connection is not None
        was_down, sent = self._retry_at > 0, 0
        try:
            while self.pending:
                write = self.pending[0]
                if write.command == "publish":
                    self.connection.publish(write.key, write.payload)
                else:
                    self.connection.hset(write.key, write.field, write.payload)
                self.pending.popleft()
                sent += 1
        except redis.RedisError as exc:
            if not was_down:
                log.warning("Redis unreachable (%s): keeping events and job state until it is back", exc)
            self._retry_at = self._clock() + self._retry_s
            self._retry_s = min(self._retry_s * 2, MAX_RETRY_S)
            return False
        if was_down:
            log.warning("Redis is back: wrote %d kept writes (%d progress events dropped)", sent, self.dropped)
        self._retry_at, self._retry_s = 0.0, FIRST_RETRY_S
        return True

    def _bound(self) -> None:
        while len(self.pending) > self.capacity:
            victim = next((w for w in self.pending if w.droppable), None)
            if victim is None:
                victim = self.pending[0]
                log.error("event buffer full: dropping a %s to %s", victim.command, victim.key)
            self.pending.remove(victim)
            self.dropped += 1
