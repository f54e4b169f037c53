"""Events on the pub/sub channel and the same state in the RQ job's meta. Neither may ever stop training."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Literal

import redis
from rq.job import Job

from app.contracts import (
    META_ERROR,
    META_LAST_EVENT,
    META_MODEL_ID,
    META_PROGRESS,
    META_REQUEST_ID,
    META_STAGE,
    META_USER_ID,
    MODEL_ID_PATTERN,
    TrainCompletedV1,
    TrainFailedV1,
    TrainProgressV1,
    TrainStartedV1,
    dump_event,
)

log = logging.getLogger(__name__)

TrainEventModel = TrainStartedV1 | TrainProgressV1 | TrainCompletedV1 | TrainFailedV1


@dataclass(frozen=True)
class EventIds:
    request_id: str
    user_id: int
    model_id: str
    job_id: str


def salvage_ids(source: object, job_id: str, meta: dict[str, object] | None = None) -> EventIds:
    """Ids for events about a job whose payload may be invalid: what is valid is kept, the rest filled."""
    fields: dict[str, object] = {}
    if isinstance(meta, dict):
        fields.update({k: meta[k] for k in (META_REQUEST_ID, META_USER_ID, META_MODEL_ID) if k in meta})
    if isinstance(source, dict):
        for key in (META_REQUEST_ID, META_USER_ID, META_MODEL_ID):
            if key not in fields and key in source:
                fields[key] = source[key]
    request_id = fields.get(META_REQUEST_ID)
    user_id = fields.get(META_USER_ID)
    model_id = fields.get(META_MODEL_ID)
    return EventIds(
        request_id=request_id if isinstance(request_id, str) and 0 < len(request_id) <= 64 else job_id[:64],
        user_id=user_id if isinstance(user_id, int) and not isinstance(user_id, bool) and 0 <= user_id < 2**64 else 0,
        model_id=model_id if isinstance(model_id, str) and re.match(MODEL_ID_PATTERN, model_id) else "unknown",
        job_id=job_id,
    )


def publish(connection: redis.Redis | None, channel: str, event: TrainEventModel) -> bool:
    """Fire and forget: a Redis error is logged and swallowed."""
    if connection is None:
        return False
    try:
        connection.publish(channel, dump_event(event))
        return True
    except redis.RedisError as exc:
        log.warning("could not publish %s for job %s: %s", event.type, event.job_id, exc,
                    extra={"job_id": event.job_id, "request_id": event.request_id})
        return False


def save_meta(job: Job | None, updates: dict[str, object]) -> None:
    if job is None:
        return
    try:
        job.meta.update(updates)
        # What Job.save_meta does, spelled out because rq leaves that method unannotated.
        job.connection.hset(job.key, "meta", job.serializer.dumps(job.meta))
    except redis.RedisError as exc:
        log.warning("could not save progress of job %s: %s", job.id, exc, extra={"job_id": job.id})


class JobReporter:
    """Tells the world how a job goes: an event on the channel and the same state in `job.meta`."""

    def __init__(self, connection: redis.Redis | None, channel: str, job: Job | None, ids: EventIds) -> None:
        self.connection = connection
        self.channel = channel
        self.job = job
        self.ids = ids

    def _ids(self) -> dict[str, object]:
        return {"request_id": self.ids.request_id, "user_id": self.ids.user_id, "model_id": self.ids.model_id,
                "job_id": self.ids.job_id}

    def stage(self, name: str) -> None:
        save_meta(self.job, {META_STAGE: name})

    def emit(self, event: TrainEventModel, meta: dict[str, object] | None = None) -> None:
        updates: dict[str, object] = {META_LAST_EVENT: dump_event(event)}
        updates.update(meta or {})
        save_meta(self.job, updates)
        publish(self.connection, self.channel, event)

    def started(self, total_epochs: int, device: str) -> None:
        self.emit(TrainStartedV1.model_validate({**self._ids(), "total_epochs": total_epochs, "device": device}),
                  {META_STAGE: "training", META_REQUEST_ID: self.ids.request_id, META_USER_ID: self.ids.user_id,
                   META_MODEL_ID: self.ids.model_id})

    def progress(self, fields: dict[str, object]) -> None:
        event = TrainProgressV1.model_validate({**self._ids(), **fields})
        self.emit(event, {META_PROGRESS: event.model_dump(mode="json", exclude={"type", "ts", "request_id",
                                                                              "user_id", "model_id", "job_id"})})

    def completed(self, val_acc: float, test_acc: float, version: str, activated: bool) -> None:
        self.emit(TrainCompletedV1.model_validate({**self._ids(), "val_acc": val_acc, "test_acc": test_acc,
                                                   "version": version, "activated": activated}),
                  {META_STAGE: "completed"})

    def failed(self, kind: Literal["user", "system"], message: str) -> None:
        self.emit(TrainFailedV1.model_validate({**self._ids(), "error_kind": kind, "message": message[:2000]}),
                  {META_STAGE: "failed", META_ERROR: {"kind": kind, "message": message[:2000]}})
