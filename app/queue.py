"""The one way training is started (`enqueue_train`) and the one way a job's state is read (`read_job`).

RQ is wrapped here, typed, so routes and the Discord handler never touch it. A job's status and
progress live in Redis as RQ's `job.meta`, under the keys app.contracts names; the worker writes them
and `read_job` (and anyone late to the events channel) reads them.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final, Literal

import redis
from pydantic import BaseModel, ConfigDict
from rq import Queue, Retry
from rq.exceptions import NoSuchJobError
from rq.job import Job, JobStatus

from app.contracts import (
    JOB_FAILURE_TTL_S,
    JOB_RESULT_TTL_S,
    JOB_RETRY_INTERVALS_S,
    JOB_RETRY_MAX,
    JOB_TIMEOUT_S,
    META_ERROR,
    META_LAST_EVENT,
    META_MODEL_ID,
    META_PROGRESS,
    META_REQUEST_ID,
    META_RESULT,
    META_STAGE,
    META_USER_ID,
    TRAIN_JOB_FUNC,
    DigitsTrainJobV1,
)
from app.estimate import check_fits
from config.settings import TrainSettings

_JOB_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")


def latest_job_key(queue: str) -> str:
    """Redis key holding the id of the last job enqueued on `queue` (what a 503 reports on)."""
    return f"digits:{queue}:latest_job"


JobState = Literal["queued", "started", "finished", "failed"]
_STATE_BY_RQ: Final[dict[str, JobState]] = {
    JobStatus.QUEUED.value: "queued",
    JobStatus.DEFERRED.value: "queued",
    JobStatus.SCHEDULED.value: "queued",  # waiting for a retry
    JobStatus.STARTED.value: "started",
    JobStatus.FINISHED.value: "finished",
    JobStatus.FAILED.value: "failed",
    JobStatus.STOPPED.value: "failed",
    JobStatus.CANCELED.value: "failed",
}


class TrainingUnavailableError(Exception):
    """Training cannot be started now (no Redis configured, or down). The message is fit for users."""


def require_connection(connection: redis.Redis | None) -> redis.Redis:
    if connection is None:
        raise TrainingUnavailableError("Training is not configured: REDIS_URL is not set.")
    return connection


def enqueue_train(connection: redis.Redis, queue_name: str, job: DigitsTrainJobV1, *, train: TrainSettings) -> str:
    """Put a validated job on the training queue with the contract's RQ options; returns the RQ job id.

    Raises JobTooLongError (nothing enqueued) when the job is estimated to run past the job timeout
    (app.estimate; `train` gives the assumed speed before any worker has measured its own)."""
    payload = DigitsTrainJobV1.model_validate(job.model_dump()).model_dump(mode="json")
    queue = Queue(queue_name, connection=connection)
    try:
        check_fits(connection, queue.name, job, train)
        rq_job = queue.enqueue_call(
            TRAIN_JOB_FUNC,
            args=(payload,),
            timeout=JOB_TIMEOUT_S,
            result_ttl=JOB_RESULT_TTL_S,
            failure_ttl=JOB_FAILURE_TTL_S,
            retry=Retry(max=JOB_RETRY_MAX, interval=list(JOB_RETRY_INTERVALS_S)),
            description=f"digits.train.v1 {job.model_id} request {job.request_id}",
            meta={
                META_REQUEST_ID: job.request_id,
                META_USER_ID: job.user_id,
                META_MODEL_ID: job.model_id,
                META_STAGE: "queued",
            },
        )
        connection.set(latest_job_key(queue.name), rq_job.id, ex=JOB_RESULT_TTL_S)
    except redis.RedisError as exc:
        raise TrainingUnavailableError(
            "Training is unavailable right now: the job queue (Redis) cannot be reached. Try again later."
        ) from exc
    return str(rq_job.id)


class JobView(BaseModel):
    """What `GET /v1/jobs/{id}` answers: status, progress, and the result or error."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    status: JobState
    stage: str | None
    request_id: str | None
    user_id: int | None
    model_id: str | None
    progress: dict[str, object] | None
    result: dict[str, object] | None
    error: dict[str, object] | None
    enqueued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None


def _dict_or_none(value: object) -> dict[str, object] | None:
    if isinstance(value, dict):
        return {str(k): v for k, v in value.items()}
    return None


def read_job(connection: redis.Redis, queue_name: str, job_id: str) -> JobView | None:
    """The job's state, or None when no training job has that id (expired jobs included)."""
    if not _JOB_ID.match(job_id):
        return None
    try:
        try:
            job = Job.fetch(job_id, connection=connection)
        except NoSuchJobError:
            return None
        if job.origin != queue_name:
            return None
        rq_status = str(job.get_status(refresh=False).value)
        meta = job.get_meta(refresh=False)
        error = _dict_or_none(meta.get(META_ERROR))
        status = _STATE_BY_RQ.get(rq_status, "queued")
        if status == "failed" and error is None:
            latest = job.latest_result()
            exc_string = (latest.exc_string or "") if latest is not None else ""
            last_line = exc_string.strip().splitlines()[-1] if exc_string.strip() else "the job failed"
            error = {"kind": "system", "message": last_line[:2000]}
    except redis.RedisError as exc:
        raise TrainingUnavailableError("Job status is unavailable right now: Redis cannot be reached.") from exc

    user_id = meta.get(META_USER_ID)
    return JobView(
        job_id=job.id,
        status=status,
        # RQ marks the job finished a moment before the worker records the completed stage: a finished job
        # has completed, whatever a poll in between would read.
        stage="completed" if status == "finished" else str(meta[META_STAGE]) if META_STAGE in meta else None,
        request_id=str(meta[META_REQUEST_ID]) if META_REQUEST_ID in meta else None,
        user_id=user_id if isinstance(user_id, int) else None,
        model_id=str(meta[META_MODEL_ID]) if META_MODEL_ID in meta else None,
        progress=_dict_or_none(meta.get(META_PROGRESS)),
        result=_dict_or_none(meta.get(META_RESULT)) if status == "finished" else None,
        error=error if status == "failed" else None,
        enqueued_at=job.enqueued_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
    )


def read_last_event(connection: redis.Redis, job_id: str) -> str | None:
    """The last event the worker recorded for a job (its JSON text), or None for no such job or event."""
    if not _JOB_ID.match(job_id):
        return None
    try:
        job = Job.fetch(job_id, connection=connection)
    except NoSuchJobError:
        return None
    raw = job.get_meta(refresh=False).get(META_LAST_EVENT)
    return raw if isinstance(raw, str) else None


def training_in_progress(connection: redis.Redis | None, queue_name: str) -> JobView | None:
    """The last enqueued job while it is queued or running; None otherwise, or when Redis can't tell."""
    if connection is None:
        return None
    try:
        raw = connection.get(latest_job_key(queue_name))
        if not isinstance(raw, bytes):
            return None
        view = read_job(connection, queue_name, raw.decode("ascii", errors="replace"))
    except (redis.RedisError, TrainingUnavailableError):
        return None
    return view if view is not None and view.status in ("queued", "started") else None


def describe_training(view: JobView) -> str:
    """One line on a running job, for people waiting on it: stage, epoch, batch and percentage."""
    progress = view.progress or {}
    pct, epoch, total = progress.get("pct"), progress.get("epoch"), progress.get("total_epochs")
    if view.status == "queued":
        where = "waiting for a worker"
    elif isinstance(pct, int | float) and isinstance(epoch, int) and isinstance(total, int):
        where = f"{pct:.0f}% done, epoch {epoch}/{total}"
    else:
        where = view.stage or "starting"
    return f"a model is training now (job {view.job_id}: {where}; GET /v1/jobs/{view.job_id} follows it)"
