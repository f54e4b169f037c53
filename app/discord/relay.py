"""Training events → the Discord user who asked: edits of the /train reply, or a DM once its token is dead.

Every API replica subscribes to the events channel (pub/sub is a broadcast) and resubscribes after
a Redis outage. For each job one replica is the relay: the first to claim `discord:relay:owner:<id>`
(a short lease, renewed by every event it sees), so each message is relayed once and a job's edits
come from one place, in order. Within that replica the newest event wins: progress is shown at most
once per `DISCORD_PROGRESS_INTERVAL_S`, and a final result is never overwritten by older progress.

Pub/sub is at-most-once: what is published while the subscription is down is gone. So after each
resubscribe the relay reads every job it tracks from the job's own record (`job.meta`'s last event, which
the worker writes once Redis is back) and shows that: a result that fell in the gap still ends the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from datetime import datetime
from typing import Final

import redis
import redis.asyncio as aioredis
from pydantic import ValidationError
from redis.exceptions import RedisError

from app.contracts import TrainCompletedV1, TrainFailedV1, TrainProgressV1, TrainStartedV1, parse_event
from app.discord.client import Delivery, DiscordClient
from app.discord.state import TrainRecord, claim_relay, train_record_key
from app.queue import read_last_event
from app.redis_client import connect_async
from config.settings import RedisSettings

TrainEvent = TrainStartedV1 | TrainProgressV1 | TrainCompletedV1 | TrainFailedV1  # what the relay shows

# An edit this soon after the interaction may race Discord's own record of our reply: retry 404s.
YOUNG_INTERACTION_S: Final = 15.0
# A job relay with nothing to do for this long lets go (a later event starts a new one).
IDLE_EXIT_S: Final = 600.0
BAR_WIDTH: Final = 20

log = logging.getLogger("app.discord.relay")


def progress_bar(pct: float) -> str:
    filled = round(max(0.0, min(100.0, pct)) / 100 * BAR_WIDTH)
    return "█" * filled + "░" * (BAR_WIDTH - filled)


def _ids(event: TrainEvent) -> str:
    return f"request id `{event.request_id}` · job id `{event.job_id}`"


def render(event: TrainEvent) -> str:
    """The /train message for an event (also the DM text for a final one)."""
    if isinstance(event, TrainStartedV1):
        detail = []
        if event.total_epochs is not None:
            detail.append(f"{event.total_epochs} epoch{'s' if event.total_epochs != 1 else ''}")
        if event.device:
            detail.append(f"on {event.device}")
        suffix = f" ({', '.join(detail)})" if detail else ""
        return f"Training `{event.model_id}` started{suffix}.\n`{progress_bar(0)}` 0%\n{_ids(event)}"
    if isinstance(event, TrainProgressV1):
        return (
            f"Training `{event.model_id}`: epoch {event.epoch}/{event.total_epochs}, "
            f"batch {event.batch}/{event.total_batches}\n"
            f"`{progress_bar(event.pct)}` {event.pct:.0f}% · loss {event.loss:.4f} · "
            f"{event.samples_per_sec:,.0f} images/s\n{_ids(event)}"
        )
    if isinstance(event, TrainCompletedV1):
        active = activation_sentence(event)
        return (
            f"Training `{event.model_id}` finished.\n"
            f"Validation accuracy {event.val_acc:.2%} · test accuracy {event.test_acc:.2%}\n"
            f"Version `{event.version}`. {active}\n{_ids(event)}"
        )
    reason = event.message.strip().splitlines()[0][:300] if event.message.strip() else "no reason given"
    who = "the request was refused" if event.error_kind == "user" else "something went wrong on our side"
    return f"Training `{event.model_id}` failed ({who}): {reason}\n{_ids(event)}"


def activation_sentence(event: TrainCompletedV1) -> str:
    """Whether the model went live, and why, with both accuracies on the API's gate set when measured."""
    cand, was = event.gate_candidate_acc, event.gate_active_acc
    figures = f" (gate set: {cand:.2%} vs {was:.2%} for the model in service)" if cand is not None and \
        was is not None else ""
    if event.activated:
        forced = " (activated with force, without the gate)" if event.gate_decision == "forced" else ""
        return f"It is now the active model{figures}{forced}."
    if event.gate_decision == "refused":
        return (f"It was not activated: the promotion gate found it worse than the model in service{figures}. "
                "The model in service is unchanged; the new version is stored and an admin can activate it.")
    reason = f": {event.activation_reason}" if event.activation_reason else ""
    return f"It was not activated{reason}; the model in service is unchanged."


def is_final(event: TrainEvent) -> bool:
    return isinstance(event, TrainCompletedV1 | TrainFailedV1)


class _JobRelay:
    """Shows one job's events in order, newest first, at a rate Discord tolerates."""

    def __init__(self, owner: ProgressRelay, record: TrainRecord) -> None:
        self.owner = owner
        self.record = record
        self.latest: TrainEvent | None = None
        self.job_id: str | None = None  # known from the first event; what a catch-up reads
        self.newest_ts: datetime | None = None  # an event older than the newest offered (a catch-up racing a
        # live event) is late: dropped
        self.finished = False
        self.token_gone = False
        self.last_edit = 0.0
        self.wake = asyncio.Event()
        self.task = asyncio.create_task(self.run(), name=f"discord-relay-{record.request_id}")

    def offer(self, event: TrainEvent) -> None:
        if self.finished or (self.newest_ts is not None and event.ts < self.newest_ts):
            return
        self.job_id, self.newest_ts = event.job_id, event.ts
        if self.latest is not None and is_final(self.latest) and not is_final(event):
            return  # a final result waiting to be shown is never displaced by older progress
        self.latest = event
        self.wake.set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    await asyncio.wait_for(self.wake.wait(), timeout=IDLE_EXIT_S)
                except TimeoutError:
                    return
                self.wake.clear()
                event, self.latest = self.latest, None
                if event is None:
                    continue
                if not is_final(event):
                    pause = self.last_edit + self.owner.interval_s - time.monotonic()
                    if pause > 0:
                        await asyncio.sleep(pause)
                        newer, self.latest = self.latest, None
                        self.wake.clear()
                        event = newer or event
                await self.deliver(event)
                self.last_edit = time.monotonic()
                if is_final(event):
                    self.finished = True
                    return
        except Exception:
            log.exception("relaying training events failed", extra={"request_id": self.record.request_id})
        finally:
            self.owner.forget(self.record.request_id, self)

    async def deliver(self, event: TrainEvent) -> None:
        content = render(event)
        now = time.time()
        if not self.token_gone and self.record.token_alive(now):
            young = now - self.record.created_at < YOUNG_INTERACTION_S
            result = await self.owner.client.edit_original(
                self.record.token, {"content": content}, not_found_retries=3 if young else 0
            )
            if result is Delivery.OK:
                return
            if result is Delivery.GONE:
                self.token_gone = True
            else:
                return  # Discord refused or was unreachable; logged by the client
        if not is_final(event):
            return  # progress is only worth showing in place
        if not self.owner.client.bot_token:
            log.info(
                "training result not delivered: the interaction token expired and DISCORD_BOT_TOKEN is not set",
                extra={"request_id": event.request_id, "job_id": event.job_id},
            )
            return
        dm = await self.owner.client.send_dm(self.record.user_id, {"content": "Your /train request:\n" + content})
        if dm is not Delivery.OK:
            log.info("training result DM not delivered (%s)", dm.value,
                     extra={"request_id": event.request_id, "job_id": event.job_id})


def _relayed(raw: bytes | str) -> TrainEvent | None:
    """The event if it is one the /train message shows; the per-batch/epoch/artifact events are for others."""
    try:
        event = parse_event(raw)
    except (ValidationError, ValueError):
        log.debug("ignoring a message that is not a training event")
        return None
    return event if isinstance(event, TrainStartedV1 | TrainProgressV1 | TrainCompletedV1 | TrainFailedV1) else None


class ProgressRelay:
    def __init__(
        self,
        redis_url: str,
        channel: str,
        client: DiscordClient,
        *,
        interval_s: float = 5.0,
        jobs: redis.Redis | None = None,
        redis_settings: RedisSettings | None = None,
    ) -> None:
        self.redis_url = redis_url
        self.jobs = jobs  # a sync client to read a job's record after a gap (RQ's Job is sync)
        self.redis_settings = redis_settings or RedisSettings()
        self.channel = channel
        self.client = client
        self.interval_s = interval_s
        self.replica_id = uuid.uuid4().hex  # names this replica when it claims a job's relay
        self.subscribed = asyncio.Event()  # set while subscribed; tests and readiness can wait on it
        self._redis: aioredis.Redis | None = None
        self._task: asyncio.Task[None] | None = None
        self._jobs: dict[str, _JobRelay] = {}

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="discord-relay")

    async def stop(self) -> None:
        tasks = [job.task for job in self._jobs.values()]
        if self._task is not None:
            tasks.append(self._task)
            self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._jobs.clear()

    def forget(self, request_id: str, job: _JobRelay) -> None:
        if self._jobs.get(request_id) is job:
            del self._jobs[request_id]

    async def _run(self) -> None:
        backoff = 0.5
        while True:
            client = connect_async(self.redis_url, self.redis_settings)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._redis = client
                log.info("relaying training events from %s", self.channel)
                await self.catch_up(client)
                self.subscribed.set()
                backoff = 0.5
                while True:
                    message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
                    if message is not None and message.get("type") == "message":
                        data = message.get("data")
                        if isinstance(data, bytes):
                            await self.on_message(data)
            except (RedisError, OSError) as exc:
                # rq#1836: nobody resubscribes for us. Events published meanwhile are lost (pub/sub).
                log.warning("events subscription lost (%s); resubscribing in %.1fs", exc, backoff)
            finally:
                self.subscribed.clear()
                self._redis = None
                with contextlib.suppress(Exception):
                    await client.aclose()  # closes the pool's connections, the subscription's included
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 10.0)

    async def catch_up(self, client: aioredis.Redis) -> None:
        """Offer each tracked job's recorded last event: what the subscription may have missed."""
        if self.jobs is None:
            return
        for job in [j for j in self._jobs.values() if not j.finished and j.job_id is not None]:
            assert job.job_id is not None
            try:
                raw = await asyncio.to_thread(read_last_event, self.jobs, job.job_id)
            except RedisError as exc:
                log.warning("could not read job %s after a gap: %s", job.job_id, exc)
                continue
            event = _relayed(raw) if raw is not None else None
            if event is not None and await claim_relay(client, event.request_id, self.replica_id):
                job.offer(event)

    async def on_message(self, raw: bytes) -> None:
        event = _relayed(raw)
        client = self._redis
        if event is None or client is None:
            return
        stored = await client.get(train_record_key(event.request_id))
        record = TrainRecord.from_json(stored if isinstance(stored, bytes) else None)
        if record is None:
            return  # not a job started from Discord
        if not await claim_relay(client, event.request_id, self.replica_id):
            return  # another replica relays this job
        job = self._jobs.get(event.request_id)
        if job is None or job.finished:
            job = _JobRelay(self, record)
            self._jobs[event.request_id] = job
        job.offer(event)
