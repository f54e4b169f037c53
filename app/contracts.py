"""The wire contracts, one home for each: the training job payload, its events, manifest v1.1.

Other programs produce and consume these shapes (an existing bot enqueues jobs; uploaders write
manifests), so the rules here are exactly those of DESIGN.md and types are strict: `true` is not
an int and `"3"` is not an int.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Annotated, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

JOB_TYPE: Final = "digits.train.v1"
# The job functions RQ is given by name (`app` never imports `worker`): ours, and the legacy target an
# existing bot enqueues, which the worker runs as the same job.
TRAIN_JOB_FUNC: Final = "worker.job.process_train_job"
LEGACY_JOB_FUNC: Final = "handwriting_ai.jobs.digits.process_train_job"
MANIFEST_SCHEMA_VERSION: Final = "v1.1"
MODEL_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
VERSION_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# The files of a stored or uploaded model: the weights and manifest v1.1 beside them.
WEIGHTS_FILE: Final = "model.pt"
MANIFEST_FILE: Final = "manifest.json"
N_CLASSES: Final = 10

# RQ options every training job is enqueued with.
JOB_TIMEOUT_S: Final = 25200
JOB_RESULT_TTL_S: Final = 86400
JOB_FAILURE_TTL_S: Final = 604800
JOB_RETRY_MAX: Final = 2
JOB_RETRY_INTERVALS_S: Final = (60, 300)

# job.meta keys: the worker writes them, `GET /v1/jobs/{id}` (and anyone late to the events channel) reads them.
META_REQUEST_ID: Final = "request_id"
META_USER_ID: Final = "user_id"
META_MODEL_ID: Final = "model_id"
META_STAGE: Final = "stage"  # queued | preparing | training | saving | uploading | completed | failed | retrying
META_PROGRESS: Final = "progress"  # the last progress event's fields
META_LAST_EVENT: Final = "last_event"  # the last event published, as its JSON text
META_RESULT: Final = "result"  # what the completed event carried, plus the artifacts' path
META_RUN_ID: Final = "run_id"  # the current training run (a retry is a new run)
META_ERROR: Final = "error"  # {"kind": "user" | "system", "message": str}

ModelId = Annotated[StrictStr, Field(pattern=MODEL_ID_PATTERN)]
RequestId = Annotated[StrictStr, Field(min_length=1, max_length=64)]
UserId = Annotated[StrictInt, Field(ge=0, le=2**64 - 1)]
Sha256Hex = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]


def utc_now() -> datetime:
    return datetime.now(UTC)


def describe_errors(errors: Sequence[Mapping[str, object]], limit: int = 5) -> str:
    """pydantic's validation errors as one line, `field.path: message; ...` (a request's `body` step left out)."""
    parts = []
    for err in errors[:limit]:
        loc = err.get("loc")
        path = ".".join(str(p) for p in loc if p != "body") if isinstance(loc, tuple | list) else ""
        message = str(err.get("msg", "invalid"))
        parts.append(f"{path}: {message}" if path else message)
    return "; ".join(parts)


DEFAULT_EPOCHS: Final = 1  # what /train, POST /v1/train and a bare job payload train with
DEFAULT_AUGMENT: Final = True


class DigitsTrainJobV1(BaseModel):
    """Payload of a `digits.train.v1` job. Defaults are those of the `/train` command."""

    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    type: Literal["digits.train.v1"] = JOB_TYPE
    request_id: RequestId
    user_id: UserId
    model_id: ModelId = "mnist_resnet18_v1"
    epochs: Annotated[StrictInt, Field(ge=1, le=100)] = DEFAULT_EPOCHS
    batch_size: Annotated[StrictInt, Field(ge=1, le=4096)] = 256
    # Strict float still takes a JSON integer (1 is a fine learning rate); it refuses bools and strings.
    lr: Annotated[StrictFloat, Field(gt=0, le=1)] = 0.0015
    seed: Annotated[StrictInt, Field(ge=-(2**31), le=2**32 - 1)] = 42
    augment: StrictBool = DEFAULT_AUGMENT
    notes: Annotated[StrictStr, Field(max_length=500)] | None = "requested via /train"


# Events: the family the gateway bot decodes (its names and JSON types, exactly), plus our own
# `progress.v1`. Ints are StrictInt so they go out as JSON integers; numbers are floats.
Count = Annotated[StrictInt, Field(ge=0)]
Positive = Annotated[StrictInt, Field(ge=1)]
Fraction = Annotated[StrictFloat, Field(ge=0, le=1)]
NonNegative = Annotated[StrictFloat, Field(ge=0)]


class _EventBase(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    request_id: RequestId
    user_id: UserId
    model_id: ModelId
    job_id: Annotated[StrictStr, Field(min_length=1)]
    run_id: StrictStr | None = None  # one per training run (a retry is a new run); null before a run starts
    ts: datetime = Field(default_factory=utc_now)


class TrainStartedV1(_EventBase):
    type: Literal["digits.train.started.v1"] = "digits.train.started.v1"
    total_epochs: Positive
    device: StrictStr | None = None
    batch_size: Positive | None = None
    augment: StrictBool | None = None
    aug_rotate: NonNegative | None = None  # degrees, the largest random rotation
    aug_translate: NonNegative | None = None  # pixels, the largest random shift
    noise_prob: Fraction | None = None
    dots_prob: Fraction | None = None
    cpu_cores: Positive | None = None
    optimal_threads: Positive | None = None
    memory_mb: Count | None = None
    optimal_workers: Count | None = None
    max_batch_size: Positive | None = None


class TrainProgressV1(_EventBase):
    type: Literal["digits.train.progress.v1"] = "digits.train.progress.v1"
    epoch: Positive
    total_epochs: Positive
    batch: Count
    total_batches: Positive
    loss: StrictFloat
    samples_per_sec: NonNegative
    pct: Annotated[StrictFloat, Field(ge=0, le=100)]


class TrainBatchV1(_EventBase):
    type: Literal["digits.train.batch.v1"] = "digits.train.batch.v1"
    epoch: Positive
    total_epochs: Positive
    batch: Count
    total_batches: Positive
    batch_loss: StrictFloat
    batch_acc: Fraction
    avg_loss: StrictFloat
    samples_per_sec: NonNegative
    main_rss_mb: Count
    workers_rss_mb: Count
    worker_count: Count
    cgroup_usage_mb: Count
    cgroup_limit_mb: Count
    cgroup_pct: NonNegative
    anon_mb: Count
    file_mb: Count


class TrainEpochV1(_EventBase):
    type: Literal["digits.train.epoch.v1"] = "digits.train.epoch.v1"
    epoch: Positive
    total_epochs: Positive
    train_loss: StrictFloat
    val_acc: Fraction
    time_s: NonNegative


class TrainBestV1(_EventBase):
    type: Literal["digits.train.best.v1"] = "digits.train.best.v1"
    epoch: Positive
    val_acc: Fraction


class TrainArtifactV1(_EventBase):
    type: Literal["digits.train.artifact.v1"] = "digits.train.artifact.v1"
    path: Annotated[StrictStr, Field(min_length=1)]


class TrainUploadV1(_EventBase):
    type: Literal["digits.train.upload.v1"] = "digits.train.upload.v1"
    status: Annotated[StrictInt, Field(ge=100, le=599)]
    model_bytes: Count
    manifest_bytes: Count


class TrainPruneV1(_EventBase):
    type: Literal["digits.train.prune.v1"] = "digits.train.prune.v1"
    deleted_count: Count


GateDecision = Literal["passed", "refused", "forced"]
ActivationReason = Annotated[StrictStr, Field(max_length=1000)]
# What the promotion gate said, as the completed event, the job's result and GET /v1/jobs/{id} carry it.
GATE_RESULT_FIELDS: Final = ("gate_decision", "gate_candidate_acc", "gate_active_acc", "activation_reason")


class TrainCompletedV1(_EventBase):
    type: Literal["digits.train.completed.v1"] = "digits.train.completed.v1"
    val_acc: Fraction
    test_acc: Fraction
    version: Annotated[StrictStr, Field(min_length=1)]
    activated: StrictBool
    # Ours, optional (the gateway bot reads the fields above): why the model went live or not.
    gate_decision: GateDecision | None = None
    gate_candidate_acc: Fraction | None = None  # on the API's gate set
    gate_active_acc: Fraction | None = None  # the model in service then, on the same set
    activation_reason: ActivationReason | None = None


class GateReport(BaseModel):
    """The promotion gate's answer, as `POST /v1/admin/models/upload` returns it in `gate` (accuracies
    are fractions of the gate set; figures are absent when nothing was measured)."""

    model_config = ConfigDict(frozen=True)

    decision: GateDecision
    activated: StrictBool
    reason: StrictStr
    candidate_acc: Annotated[float, Field(ge=0, le=1)] | None = None
    active_acc: Annotated[float, Field(ge=0, le=1)] | None = None
    active_version: StrictStr | None = None
    tolerance_points: float
    images: int | None = None
    seconds: float | None = None


class TrainFailedV1(_EventBase):
    type: Literal["digits.train.failed.v1"] = "digits.train.failed.v1"
    error_kind: Literal["user", "system"]
    message: Annotated[StrictStr, Field(max_length=2000)]


TrainEventModel = (
    TrainStartedV1 | TrainProgressV1 | TrainBatchV1 | TrainEpochV1 | TrainBestV1 | TrainArtifactV1
    | TrainUploadV1 | TrainPruneV1 | TrainCompletedV1 | TrainFailedV1
)
TrainEvent = Annotated[TrainEventModel, Field(discriminator="type")]


class _EventEnvelope(BaseModel):
    event: TrainEvent


def parse_event(raw: bytes | str) -> TrainEventModel:
    """Parse one message of the events channel; raises pydantic.ValidationError on anything else."""
    text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    return _EventEnvelope.model_validate_json('{"event":' + text + "}").event


def dump_event(event: TrainEventModel) -> str:
    """Compact JSON, one object per message, as the events channel carries it."""
    return event.model_dump_json()


class ManifestV1_1(BaseModel):
    """`manifest.json` beside the weights. Fields beyond the required core describe the run."""

    model_config = ConfigDict(strict=True, extra="ignore", frozen=True)

    schema_version: Literal["v1.1"]
    model_id: ModelId
    arch: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    n_classes: Annotated[StrictInt, Field(ge=2, le=1000)]
    version: Annotated[StrictStr, Field(pattern=VERSION_PATTERN)]
    created_at: datetime
    preprocess_hash: Sha256Hex
    val_acc: Annotated[StrictFloat, Field(ge=0, le=1)]
    temperature: Annotated[StrictFloat, Field(gt=0, le=100)] = 1.0

    test_acc: Annotated[StrictFloat, Field(ge=0, le=1)] | None = None
    epochs: Annotated[StrictInt, Field(ge=1)] | None = None
    batch_size: Annotated[StrictInt, Field(ge=1)] | None = None
    lr: Annotated[StrictFloat, Field(gt=0)] | None = None
    seed: StrictInt | None = None
    augment: StrictBool | None = None
    device: StrictStr | None = None
    train_seconds: Annotated[StrictFloat, Field(ge=0)] | None = None
    weights_sha256: Sha256Hex | None = None
    train_samples: Annotated[StrictInt, Field(ge=0)] | None = None
    notes: StrictStr | None = None
