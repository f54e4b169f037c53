"""Events on the pub/sub channel and the same state in the RQ job's meta. Neither may ever stop training."""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import redis
from rq.job import Job

from app.contracts import (
    GATE_RESULT_FIELDS,
    META_ERROR,
    META_LAST_EVENT,
    META_MODEL_ID,
    META_PROGRESS,
    META_REQUEST_ID,
    META_RUN_ID,
    META_STAGE,
    META_USER_ID,
    MODEL_ID_PATTERN,
    TrainArtifactV1,
    TrainBatchV1,
    TrainBestV1,
    TrainCompletedV1,
    TrainEpochV1,
    TrainEventModel,
    TrainFailedV1,
    TrainProgressV1,
    TrainPruneV1,
    TrainStartedV1,
    TrainUploadV1,
    dump_event,
)
from worker.hooks import RunHooks, RunStart
from worker.memory import snapshot
from worker.outbox import RedisOutbox, Write

if TYPE_CHECKING:
    from worker.train import EpochReport, Progress
    from worker.upload import UploadResult

log = logging.getLogger(__name__)

# A newer one of these says all an older one did: the first to go when an outage fills the outbox.
DROPPABLE_EVENTS: Final = frozenset({"digits.train.progress.v1", "digits.train.batch.v1"})

@dataclass(frozen=True)
class EventIds:
    request_id: str
    user_id: int
    model_id: str
    job_id: str
    run_id: str | None = None


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
    run_id = meta.get(META_RUN_ID) if isinstance(meta, dict) else None
    return EventIds(
        request_id=request_id if isinstance(request_id, str) and 0 < len(request_id) <= 64 else job_id[:64],
        user_id=user_id if isinstance(user_id, int) and not isinstance(user_id, bool) and 0 <= user_id < 2**64 else 0,
        model_id=model_id if isinstance(model_id, str) and re.match(MODEL_ID_PATTERN, model_id) else "unknown",
        job_id=job_id,
        run_id=run_id if isinstance(run_id, str) and run_id else None,
    )


def timed_out_message(limit_s: float) -> str:
    limit = f"{limit_s / 3600:.1f} h" if limit_s >= 3600 else f"{limit_s:.0f} s"
    return (f"the job ran past its time limit of {limit} and was stopped; it is not retried (a retry would start "
            "over and stop at the same point)")


def meta_write(job: Job) -> Write:
    """The job's whole meta as RQ stores it (what `Job.save_meta` writes; rq leaves that method unannotated)."""
    return Write("hset", job.key, job.serializer.dumps(job.meta), field="meta")


def save_meta(job: Job | None, updates: dict[str, object], outbox: RedisOutbox | None = None) -> None:
    """Update the job's meta; through `outbox` when given (kept across an outage), else at once or not at all."""
    if job is None:
        return
    job.meta.update(updates)
    if outbox is not None:
        outbox.send(meta_write(job))
        return
    try:
        job.connection.hset(job.key, "meta", job.serializer.dumps(job.meta))
    except redis.RedisError as exc:
        log.warning("could not save progress of job %s: %s", job.id, exc, extra={"job_id": job.id})


class JobReporter(RunHooks):
    """Tells the world how a job goes, as a run's hooks: an event on the channel and the same state in
    `job.meta`, both through one outbox so an outage delays them (in order) instead of losing them."""

    def __init__(self, connection: redis.Redis | None, channel: str, job: Job | None, ids: EventIds,
                 *, buffer_max: int = 2000) -> None:
        self.outbox = RedisOutbox(connection, capacity=buffer_max)
        self.channel = channel
        self.job = job
        self.ids = ids

    def save(self, updates: dict[str, object]) -> None:
        save_meta(self.job, updates, self.outbox)

    def write(self, write: Write) -> None:
        """Another write that belongs to this job's story (kept in order with its events)."""
        self.outbox.send(write)

    def flush(self, wait_s: float) -> bool:
        """Everything kept is written, waiting up to `wait_s` for Redis to come back. True when all went."""
        return self.outbox.flush(wait_s)

    def _ids(self) -> dict[str, object]:
        return {"request_id": self.ids.request_id, "user_id": self.ids.user_id, "model_id": self.ids.model_id,
                "job_id": self.ids.job_id, "run_id": self.ids.run_id}

    def stage(self, name: str) -> None:
        self.save({META_STAGE: name})

    def emit(self, event: TrainEventModel, meta: dict[str, object] | None = None) -> None:
        updates: dict[str, object] = {META_LAST_EVENT: dump_event(event)}
        updates.update(meta or {})
        self.save(updates)
        self.outbox.send(Write("publish", self.channel, dump_event(event).encode("utf-8"),
                               droppable=event.type in DROPPABLE_EVENTS))

    def run_started(self, start: RunStart) -> None:
        self.ids = replace(self.ids, run_id=start.run_id)
        self.emit(TrainStartedV1.model_validate({**self._ids(), **start.details, "total_epochs": start.total_epochs}),
                  {META_REQUEST_ID: self.ids.request_id, META_USER_ID: self.ids.user_id,
                   META_MODEL_ID: self.ids.model_id, META_RUN_ID: start.run_id})

    def progress(self, progress: Progress) -> None:
        p = progress
        event = TrainProgressV1.model_validate({
            **self._ids(), "epoch": p.epoch, "total_epochs": p.total_epochs, "batch": p.batch,
            "total_batches": p.total_batches, "loss": p.loss, "samples_per_sec": p.samples_per_sec, "pct": p.pct,
        })
        self.emit(event, {META_PROGRESS: event.model_dump(mode="json", exclude={"type", "ts", "request_id",
                                                                              "user_id", "model_id", "job_id",
                                                                              "run_id"})})
        memory = snapshot()
        self.emit(TrainBatchV1.model_validate({
            **self._ids(), "epoch": p.epoch, "total_epochs": p.total_epochs, "batch": p.batch,
            "total_batches": p.total_batches, "batch_loss": p.batch_loss, "batch_acc": p.batch_acc,
            "avg_loss": p.avg_loss, "samples_per_sec": p.samples_per_sec, "main_rss_mb": memory.main_rss_mb,
            "workers_rss_mb": memory.workers_rss_mb, "worker_count": memory.worker_count,
            "cgroup_usage_mb": memory.cgroup.usage_mb, "cgroup_limit_mb": memory.cgroup.limit_mb,
            "cgroup_pct": memory.cgroup.pct, "anon_mb": memory.cgroup.anon_mb, "file_mb": memory.cgroup.file_mb,
        }))

    def epoch(self, report: EpochReport) -> None:
        self.emit(TrainEpochV1.model_validate({
            **self._ids(), "epoch": report.epoch, "total_epochs": report.total_epochs,
            "train_loss": report.train_loss, "val_acc": report.val_acc, "time_s": report.time_s,
        }))
        if report.is_best:
            self.emit(TrainBestV1.model_validate({**self._ids(), "epoch": report.epoch, "val_acc": report.val_acc}))

    def artifact(self, path: Path) -> None:
        self.emit(TrainArtifactV1.model_validate({**self._ids(), "path": str(path)}))

    def uploaded(self, result: UploadResult) -> None:
        self.emit(TrainUploadV1.model_validate({**self._ids(), "status": result.status,
                                                "model_bytes": result.model_bytes,
                                                "manifest_bytes": result.manifest_bytes}))

    def pruned(self, deleted_count: int) -> None:
        self.emit(TrainPruneV1.model_validate({**self._ids(), "deleted_count": deleted_count}))

    def completed(self, val_acc: float, test_acc: float, version: str, activated: bool,
                  gate: Mapping[str, object] | None = None) -> None:
        """`gate`: the job result's GATE_RESULT_FIELDS (whether and why the model went live), when known."""
        why = {k: v for k, v in (gate or {}).items() if k in GATE_RESULT_FIELDS and v is not None}
        self.emit(TrainCompletedV1.model_validate({**self._ids(), "val_acc": val_acc, "test_acc": test_acc,
                                                   "version": version, "activated": activated, **why}),
                  {META_STAGE: "completed"})

    def failed(self, kind: Literal["user", "system"], message: str) -> None:
        self.emit(TrainFailedV1.model_validate({**self._ids(), "error_kind": kind, "message": message[:2000]}),
                  {META_STAGE: "failed", META_ERROR: {"kind": kind, "message": message[:2000]}})
