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
from typing import Literal

import redis
from rq import Queue, Worker
from rq.job import Job
from rq.registry import StartedJobRegistry

from app.contracts import LEGACY_JOB_FUNC, META_ERROR, META_RESULT, META_STAGE, TRAIN_JOB_FUNC
from config.settings import Settings, get_settings
from worker.events import JobReporter, salvage_ids, save_meta

log = logging.getLogger(__name__)

TRAIN_FUNCS = frozenset({TRAIN_JOB_FUNC, LEGACY_JOB_FUNC})


def _is_training_job(job: Job) -> bool:
    try:
        return job.func_name in TRAIN_FUNCS
    except Exception:  # an undeserialisable job is not ours to report on
        return False


def _last_line(exc_string: str) -> str:
    lines = [line for line in exc_string.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "the job failed"


class TrainWorker(Worker):
    """RQ's forking Worker with the training job's terminal reporting."""

    def _reporter(self, job: Job) -> JobReporter:
        args = job.args if job.args else ()
        payload = args[0] if args else None
        ids = salvage_ids(payload, job.id, job.meta)
        return JobReporter(self.connection, get_settings().digits_events_channel, job, ids)

    def handle_work_horse_killed(self, job: Job, retpid: int, ret_val: int, rusage: object) -> None:
        # RQ's own version only logs and calls an optional handler we do not use.
        self.log.warning("Work horse killed for job %s: retpid=%s, ret_val=%s", job.id, retpid, ret_val)
        if not _is_training_job(job):
            return
        with contextlib.suppress(redis.RedisError):
            job.get_meta(refresh=True)  # the horse wrote progress we have not seen
        if os.WIFSIGNALED(ret_val):
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
            save_meta(job, {META_STAGE: "retrying", META_ERROR: {"kind": kind, "message": message}})

    def handle_job_success(self, job: Job, queue: Queue, started_job_registry: StartedJobRegistry) -> None:
        super().handle_job_success(job, queue, started_job_registry)
        if not _is_training_job(job):
            return
        result = job.meta.get(META_RESULT)
        if isinstance(result, dict):
            try:
                self._reporter(job).completed(
                    val_acc=float(result["val_acc"]), test_acc=float(result["test_acc"]),
                    version=str(result["version"]), activated=result.get("activated") is True, gate=result,
                )
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("job %s finished without a usable result: %s", job.id, exc, extra={"job_id": job.id})


def run_worker(settings: Settings, *, burst: bool = False, name: str | None = None) -> bool:
    """Work the training queue (with the scheduler, so retry intervals happen) until stopped."""
    if settings.redis_url is None:
        raise SystemExit("digits worker: REDIS_URL is not set; the worker needs Redis")
    connection = redis.Redis.from_url(settings.redis_url)  # bytes replies, as RQ expects
    queue = Queue(settings.rq.queue, connection=connection)
    worker = TrainWorker([queue], connection=connection, name=name)
    return bool(worker.work(burst=burst, with_scheduler=True, logging_level=settings.log_level.upper()))
