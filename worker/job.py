"""The RQ job function (`process_train_job`) and the run it shares with `digits train` (`run_training`).

The job validates its payload before anything else: an invalid one fails at once as a user error and
is not retried. Progress goes to the events channel and `job.meta` as training runs; the terminal
events (completed / failed) are published by `worker.rq_worker.TrainWorker` once RQ has recorded the
outcome, so a subscriber that reads `GET /v1/jobs/{id}` on the event always sees the final status.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from pydantic import ValidationError
from rq import get_current_job
from rq.job import Job

from app.contracts import (
    META_ERROR,
    META_MODEL_ID,
    META_REQUEST_ID,
    META_RESULT,
    META_USER_ID,
    DigitsTrainJobV1,
    describe_errors,
)
from app.network import available_cores
from config.settings import Settings, get_settings
from worker.artifacts import mark_uploaded, prune_artifacts, write_artifacts
from worker.augment import MAX_ROTATE_DEG, MAX_SHIFT_PX
from worker.data import MnistUnavailableError, load_mnist
from worker.events import JobReporter, salvage_ids, save_meta
from worker.hooks import RunHooks, RunStart
from worker.memory import read_cgroup
from worker.train import pick_hardware, train
from worker.upload import UploadError, upload_artifacts

log = logging.getLogger(__name__)


class JobFailure(Exception):
    """A failure the job understands: who is at fault, what to tell them, and whether a retry could help."""

    def __init__(self, kind: Literal["user", "system"], message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.kind: Literal["user", "system"] = kind
        self.message = message
        self.retryable = retryable


@dataclass(frozen=True)
class RunResult:
    model_id: str
    version: str
    val_acc: float
    test_acc: float
    activated: bool
    uploaded: bool
    artifacts_dir: str
    device: str
    train_seconds: float
    train_samples: int
    upload_note: str | None = None

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def run_training(
    job: DigitsTrainJobV1,
    settings: Settings,
    hooks: RunHooks,
    *,
    out_dir: Path | None = None,
    upload_url: str | None = None,
    upload: bool = True,
) -> RunResult:
    """Data, training, artifacts, upload. Raises JobFailure with a message fit for the user."""
    hardware = pick_hardware(settings.train)
    label, t = hardware.describe(), settings.train
    hooks.run_started(RunStart(run_id=uuid.uuid4().hex, total_epochs=job.epochs, device=label, details={
        "device": label, "batch_size": job.batch_size, "augment": job.augment,
        "aug_rotate": MAX_ROTATE_DEG if job.augment else 0.0, "aug_translate": MAX_SHIFT_PX if job.augment else 0.0,
        "noise_prob": t.noise_prob, "dots_prob": t.dots_prob,
        "cpu_cores": available_cores(), "optimal_threads": hardware.threads, "memory_mb": read_cgroup().limit_mb,
        "optimal_workers": 0,  # batches are cut from tensors in memory: no data-loader worker processes
    }))

    hooks.stage("preparing")
    try:
        data = load_mnist(settings.cache_dir, val_size=settings.train.val_size, limit=settings.train.limit,
                          workers=hardware.threads, on_status=lambda msg: log.info(msg))
    except MnistUnavailableError as exc:
        raise JobFailure("system", f"training data unavailable: {exc}") from exc

    hooks.stage("training")
    outcome = train(job, settings.train, data, hardware, on_progress=hooks.progress, on_epoch=hooks.epoch)

    hooks.stage("saving")
    used = settings.train.model_dump(mode="json", exclude={"upload_attempts", "upload_backoff_s", "upload_timeout_s",
                                                          "keep_artifacts"})
    artifacts = write_artifacts(out_dir or settings.artifacts_dir, job, outcome, used, arch=settings.train.arch)
    log.info("artifacts written to %s (val_acc %.4f, test_acc %.4f)", artifacts.directory, outcome.val_acc,
             outcome.test_acc)
    hooks.artifact(artifacts.directory)

    activated = uploaded = False
    note: str | None = None
    key = settings.handwriting_api_key
    if upload and key is None:
        note = "not uploaded: HANDWRITING_API_KEY is not set"
    elif upload:
        hooks.stage("uploading")
        url = upload_url or settings.handwriting_api_url
        t = settings.train
        try:
            result = upload_artifacts(artifacts, url, key.get_secret_value() if key else "",
                                      attempts=t.upload_attempts, backoff_s=t.upload_backoff_s,
                                      timeout_s=t.upload_timeout_s)
        except UploadError as exc:
            raise JobFailure("system", f"{exc}. The trained model is kept at {artifacts.directory}") from exc
        activated, uploaded = result.activated, True
        hooks.uploaded(result)
        try:  # housekeeping: a disk error here must not fail a run whose model is already live
            mark_uploaded(artifacts, result.status)
            # Only our own DATA_DIR/artifacts is pruned, never a directory the user chose.
            deleted = prune_artifacts(settings.artifacts_dir, settings.train.keep_artifacts) if out_dir is None else 0
        except OSError as exc:
            log.warning("could not mark or prune artifacts under %s: %s", artifacts.directory.parent.parent, exc)
            deleted = 0
        if deleted:
            log.info("pruned %d uploaded run(s) from %s", deleted, settings.artifacts_dir)
            hooks.pruned(deleted)
    return RunResult(
        model_id=job.model_id, version=artifacts.version, val_acc=round(outcome.val_acc, 6),
        test_acc=round(outcome.test_acc, 6), activated=activated, uploaded=uploaded,
        artifacts_dir=str(artifacts.directory), device=outcome.device, train_seconds=round(outcome.seconds, 2),
        train_samples=outcome.train_samples, upload_note=note,
    )


def parse_payload(payload: object) -> DigitsTrainJobV1:
    """The payload as enqueued (a dict; a JSON text is accepted too). Raises JobFailure('user')."""
    try:
        if isinstance(payload, str | bytes):
            return DigitsTrainJobV1.model_validate_json(payload)
        if not isinstance(payload, dict):
            raise JobFailure("user", f"invalid digits.train.v1 payload: expected a JSON object, got "
                                     f"{type(payload).__name__}")
        return DigitsTrainJobV1.model_validate(payload)
    except ValidationError as exc:
        raise JobFailure("user", f"invalid digits.train.v1 payload: {describe_errors(exc.errors())}") from exc


def _record_failure(rq_job: Job | None, failure: JobFailure) -> None:
    if rq_job is None:
        return
    if not failure.retryable:
        rq_job.retries_left = 0  # RQ's worker reads this when it decides whether to retry
    save_meta(rq_job, {META_ERROR: {"kind": failure.kind, "message": failure.message[:2000]}})


def process_train_job(payload: object) -> dict[str, object]:
    """RQ entry point for a `digits.train.v1` job (also reached through the legacy target string)."""
    rq_job = get_current_job()
    settings = get_settings()
    job_id = rq_job.id if rq_job is not None else "local"
    try:
        job = parse_payload(payload)
    except JobFailure as failure:
        if rq_job is not None:
            ids = salvage_ids(payload if not isinstance(payload, str | bytes) else _loads(payload), job_id,
                              rq_job.meta)
            save_meta(rq_job, {META_REQUEST_ID: ids.request_id, META_USER_ID: ids.user_id, META_MODEL_ID: ids.model_id})
        _record_failure(rq_job, failure)
        raise

    ids = salvage_ids(job.model_dump(), job_id)
    save_meta(rq_job, {"pid": os.getpid()})  # the work-horse, for operators (and the SIGKILL test)
    reporter = JobReporter(rq_job.connection if rq_job is not None else None, settings.digits_events_channel,
                           rq_job, ids)
    try:
        result = run_training(job, settings, reporter)
    except JobFailure as failure:
        _record_failure(rq_job, failure)
        raise
    except Exception as exc:
        # Unexpected: RQ's retry policy applies. The message is the exception's own line.
        _record_failure(rq_job, JobFailure("system", f"{type(exc).__name__}: {exc}", retryable=True))
        raise
    save_meta(rq_job, {META_RESULT: result.as_dict()})
    return result.as_dict()


def _loads(raw: str | bytes) -> object:
    try:
        value: object = json.loads(raw)
    except ValueError:
        return None
    return value
