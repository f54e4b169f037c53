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
    GateReport,
    describe_errors,
)
from app.estimate import Throughput, throughput_key
from app.network import available_cores
from app.redis_client import connect
from config.settings import Settings, get_settings
from worker.artifacts import mark_uploaded, prune_artifacts, write_artifacts
from worker.augment import MAX_ROTATE_DEG, MAX_SHIFT_PX
from worker.data import MnistUnavailableError, load_mnist
from worker.events import JobReporter, salvage_ids
from worker.hooks import RunHooks, RunStart
from worker.memory import read_cgroup
from worker.outbox import Write
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
    epochs: int
    arch: str
    upload_note: str | None = None
    # The API's promotion gate (app.contracts.GATE_RESULT_FIELDS): why the model went live or not.
    gate_decision: str | None = None
    gate_candidate_acc: float | None = None
    gate_active_acc: float | None = None
    activation_reason: str | None = None

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
                          workers=hardware.threads, on_status=lambda msg: log.info(msg),
                          photo_share=settings.train.photo_share)
    except MnistUnavailableError as exc:
        raise JobFailure("system", f"training data unavailable: {exc}") from exc

    hooks.stage("training")
    outcome = train(job, settings.train, data, hardware, on_progress=hooks.progress, on_epoch=hooks.epoch)

    hooks.stage("saving")
    used = settings.train.model_dump(mode="json", exclude={"upload_attempts", "upload_backoff_s", "upload_timeout_s",
                                                          "upload_max_backoff_s", "keep_artifacts",
                                                          "estimate_images_per_s"})
    artifacts = write_artifacts(out_dir or settings.artifacts_dir, job, outcome, used, arch=settings.train.arch)
    log.info("artifacts written to %s (val_acc %.4f, test_acc %.4f)", artifacts.directory, outcome.val_acc,
             outcome.test_acc)
    hooks.artifact(artifacts.directory)

    activated = uploaded = False
    note: str | None = None
    gate: GateReport | None = None
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
                                      timeout_s=t.upload_timeout_s, max_backoff_s=t.upload_max_backoff_s)
        except UploadError as exc:
            raise JobFailure("system", f"{exc}. The trained model is kept at {artifacts.directory}") from exc
        activated, uploaded = result.activated, True
        gate = result.gate
        if not activated:
            note = gate.reason if gate is not None else "uploaded; the API did not activate it"
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
        train_samples=outcome.train_samples, epochs=job.epochs, arch=str(artifacts.manifest["arch"]), upload_note=note,
        gate_decision=gate.decision if gate else None, gate_candidate_acc=gate.candidate_acc if gate else None,
        gate_active_acc=gate.active_acc if gate else None, activation_reason=gate.reason[:1000] if gate else None,
    )


def throughput_write(queue: str, result: RunResult) -> Write:
    """This worker's measured speed, for the estimate the API makes before it enqueues a job."""
    rate = Throughput(device=result.device, arch=result.arch, epoch_images=result.train_samples,
                      images_per_s=result.train_samples * result.epochs / max(result.train_seconds, 1e-3))
    return Write("hset", throughput_key(queue), rate.model_dump_json().encode("utf-8"), field=rate.field)


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


def _record_failure(rq_job: Job | None, reporter: JobReporter, failure: JobFailure) -> None:
    if rq_job is None:
        return
    if not failure.retryable:
        rq_job.retries_left = 0  # RQ's worker reads this when it decides whether to retry
    reporter.save({META_ERROR: {"kind": failure.kind, "message": failure.message[:2000]}})


def process_train_job(payload: object) -> dict[str, object]:
    """RQ entry point for a `digits.train.v1` job (also reached through the legacy target string).

    Events and state go through one outbox on a connection of our own (REDIS__* timeouts). Before the
    job returns or raises, everything kept is written, waiting up to REDIS__OUTAGE_S for a Redis that
    went away: RQ records the outcome right after, and would fail the finished job if Redis were still out.
    """
    rq_job = get_current_job()
    settings = get_settings()
    job_id = rq_job.id if rq_job is not None else "local"
    own = connect(settings.redis_url, settings.redis) if rq_job is not None and settings.redis_url else None
    connection = own or (rq_job.connection if rq_job is not None else None)
    reporter = JobReporter(connection, settings.digits_events_channel, rq_job,
                           salvage_ids(None, job_id), buffer_max=settings.redis.buffer_max)
    try:
        return _run_job(payload, rq_job, settings, reporter)
    finally:
        reporter.flush(settings.redis.outage_s)
        if own is not None:
            own.close()


def _run_job(payload: object, rq_job: Job | None, settings: Settings, reporter: JobReporter) -> dict[str, object]:
    job_id = reporter.ids.job_id
    try:
        job = parse_payload(payload)
    except JobFailure as failure:
        if rq_job is not None:
            ids = salvage_ids(payload if not isinstance(payload, str | bytes) else _loads(payload), job_id,
                              rq_job.meta)
            reporter.save({META_REQUEST_ID: ids.request_id, META_USER_ID: ids.user_id, META_MODEL_ID: ids.model_id})
        _record_failure(rq_job, reporter, failure)
        raise

    reporter.ids = salvage_ids(job.model_dump(), job_id)
    reporter.save({"pid": os.getpid()})  # the work-horse, for operators (and the SIGKILL test)
    try:
        result = run_training(job, settings, reporter)
    except JobFailure as failure:
        _record_failure(rq_job, reporter, failure)
        raise
    except Exception as exc:
        # Unexpected: RQ's retry policy applies. The message is the exception's own line.
        _record_failure(rq_job, reporter, JobFailure("system", f"{type(exc).__name__}: {exc}", retryable=True))
        raise
    reporter.save({META_RESULT: result.as_dict()})
    reporter.write(throughput_write(settings.rq.queue, result))
    return result.as_dict()


def _loads(raw: str | bytes) -> object:
    try:
        value: object = json.loads(raw)
    except ValueError:
        return None
    return value
