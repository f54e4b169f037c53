"""`digits worker`: a standard RQ worker (`rq info` lists it) whose hooks report every job's end.

Failure reporting that must always happen lives here, in the worker, not in enqueue-time callbacks:
jobs enqueued by other programs (the legacy target string) carry no callbacks of ours. RQ calls
`handle_job_failure` both in the work-horse (the job raised) and in the parent (the work-horse was
killed, e.g. SIGKILL by the OOM killer), so one override covers both; the terminal events go out
after RQ has recorded the outcome.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
from collections.abc import Callable
from typing import Final, Literal

import redis
from redis.client import Pipeline
from rq import Queue, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry
from rq.timeouts import JobTimeoutException

from app.contracts import JOB_TIMEOUT_S, LEGACY_JOB_FUNC, META_ERROR, META_RESULT, META_STAGE, TRAIN_JOB_FUNC
from app.redis_client import connect
from config.settings import Settings, get_settings
from worker.events import JobReporter, salvage_ids, timed_out_message

log = logging.getLogger(__name__)

TRAIN_FUNCS = frozenset({TRAIN_JOB_FUNC, LEGACY_JOB_FUNC})
TIMEOUT_EXCEPTION: Final = f"{JobTimeoutException.__module__}.{JobTimeoutException.__qualname__}"


def _is_training_job(job: Job) -> bool:
    try:
        return job.func_name in TRAIN_FUNCS
    except Exception:  # an undeserialisable job is not ours to report on
        return False


def _last_line(exc_string: str) -> str:
    lines = [line for line in exc_string.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "the job failed"


# RQ's blocking dequeue waits WORKER_TTL_S - 15 s and its connection's socket timeout is raised to 10 s more
# (rq Worker._set_connection): 25 makes that a 10 s poll on a connection that gives up after 20 s.
WORKER_TTL_S: Final = 25
# The parent's heartbeat for a running job (RQ's default is 30 s): a Redis back from an outage hears from it soon.
JOB_MONITORING_INTERVAL_S: Final = 10


class TrainWorker(Worker):
    """RQ's forking Worker with the training job's terminal reporting, riding out a Redis outage.

    RQ's loop lets a Redis error in a heartbeat end the worker (and orphan the work-horse mid-job); here
    the parent's bookkeeping writes are best effort while Redis is away, and the job's lease (its heartbeat
    TTL) is REDIS__OUTAGE_S longer, so an outage of that length is not mistaken for a dead worker.
    """

    outage_s: float = 0.0

    def _redis_hiccup(self, what: str, exc: redis.RedisError) -> None:
        self.log.warning("Worker %s: %s skipped, Redis unreachable (%s)", self.name, what, exc)

    def heartbeat(self, timeout: int | None = None, pipeline: Pipeline | None = None) -> None:
        if pipeline is not None:
            super().heartbeat(timeout, pipeline=pipeline)
            return
        try:
            super().heartbeat(timeout)
        except redis.RedisError as exc:
            self._redis_hiccup("heartbeat", exc)

    def maintain_heartbeats(self, job: Job) -> None:
        try:
            super().maintain_heartbeats(job)
        except redis.RedisError as exc:
            self._redis_hiccup("job heartbeat", exc)

    def set_current_job_working_time(self, current_job_working_time: float, pipeline: Pipeline | None = None) -> None:
        try:
            super().set_current_job_working_time(current_job_working_time, pipeline=pipeline)
        except redis.RedisError as exc:
            self._redis_hiccup("working time", exc)

    def set_state(self, state: str, pipeline: Pipeline | None = None) -> None:
        try:
            super().set_state(state, pipeline=pipeline)
        except redis.RedisError as exc:
            self._redis_hiccup("state", exc)

    def check_for_suspension(self, burst: bool) -> None:
        try:
            super().check_for_suspension(burst)
        except redis.RedisError as exc:
            self._redis_hiccup("suspension check", exc)

    def run_maintenance_tasks(self) -> None:
        maintain: Callable[[], None] = super().run_maintenance_tasks  # rq leaves it unannotated
        try:
            maintain()
        except redis.RedisError as exc:
            self._redis_hiccup("maintenance", exc)

    def get_heartbeat_ttl(self, job: Job) -> int:
        return int(super().get_heartbeat_ttl(job) + self.outage_s)

    def _reporter(self, job: Job) -> JobReporter:
        args = job.args if job.args else ()
        payload = args[0] if args else None
        ids = salvage_ids(payload, job.id, job.meta)
        settings = get_settings()
        return JobReporter(self.connection, settings.digits_events_channel, job, ids,
                           buffer_max=settings.redis.buffer_max)

    def handle_work_horse_killed(self, job: Job, retpid: int | None, ret_val: int | None, rusage: object) -> None:
        # RQ's own version only logs and calls an optional handler we do not use.
        self.log.warning("Work horse killed for job %s: retpid=%s, ret_val=%s", job.id, retpid, ret_val)
        if not _is_training_job(job):
            return
        with contextlib.suppress(redis.RedisError):
            job.get_meta(refresh=True)  # the horse wrote progress we have not seen
        if ret_val is None:  # RQ's monitor killed it itself: past the job timeout (+60 s) and not stopping
            why = timed_out_message(job.timeout or JOB_TIMEOUT_S)
        elif os.WIFSIGNALED(ret_val):
            sig = os.WTERMSIG(ret_val)
            name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
            why = f"the training process was killed by {name}"
            if sig == signal.SIGKILL:
                why += " (often the out-of-memory killer)"
        else:
            why = f"the training process exited unexpectedly with status {os.WEXITSTATUS(ret_val)}"
        # Killed mid-run: a retry would most likely die the same way, so the job ends here.
        job.retries_left = 0
        job.meta[META_ERROR] = {"kind": "system", "message": why}

    def handle_job_failure(
        self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry | None = None, exc_string: str = ""
    ) -> None:
        if _is_training_job(job) and TIMEOUT_EXCEPTION in exc_string:
            # RQ counts its own timeout as retryable: a retry would run 7 h again and stop at the same point.
            job.retries_left = 0
            job.meta[META_ERROR] = {"kind": "system", "message": timed_out_message(job.timeout or JOB_TIMEOUT_S)}
        final = not (job.should_retry and self._stopped_job_id != job.id)
        stopped = self._stopped_job_id == job.id
        super().handle_job_failure(job, queue, started_job_registry=started_job_registry, exc_string=exc_string)
        if not _is_training_job(job):
            return
        error = job.meta.get(META_ERROR)
        kind: Literal["user", "system"] = "system"
        message = "the job was stopped" if stopped else _last_line(exc_string)
        if isinstance(error, dict):
            kind = "user" if error.get("kind") == "user" else "system"
            message = str(error.get("message") or message)
        reporter = self._reporter(job)
        if final:
            reporter.failed(kind, message)
        else:
            reporter.save({META_STAGE: "retrying", META_ERROR: {"kind": kind, "message": message}})
        reporter.flush(self.outage_s)

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry) -> None:
        super().handle_job_success(job, queue, started_job_registry)
        if not _is_training_job(job):
            return
        result = job.meta.get(META_RESULT)
        if isinstance(result, dict):
            reporter = self._reporter(job)
            try:
                reporter.completed(
                    val_acc=float(result["val_acc"]), test_acc=float(result["test_acc"]),
                    version=str(result["version"]), activated=result.get("activated") is True, gate=result,
                )
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("job %s finished without a usable result: %s", job.id, exc, extra={"job_id": job.id})
            reporter.flush(self.outage_s)


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None) -> bool:
    """Work the training queue (with the scheduler, so retry intervals happen) until stopped."""
    if settings.redis_url is None:
        raise SystemExit("digits worker: REDIS_URL is not set; the worker needs Redis")
    connection = connect(settings.redis_url, settings.redis)
    queue = Queue(settings.rq.queue, connection=connection)
    worker = TrainWorker([queue], connection=connection, name=name, worker_ttl=WORKER_TTL_S,
                         job_monitoring_interval=JOB_MONITORING_INTERVAL_S)
    worker.outage_s = settings.redis.outage_s
    return bool(worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level.upper()))
