"""The wire contracts accept exactly what DESIGN.md allows and refuse the rest."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from app.contracts import (
    DigitsTrainJobV1,
    ManifestV1_1,
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
    parse_event,
)
from app.preprocess import PREPROCESS_HASH

VALID_JOB: dict[str, object] = {
    "type": "digits.train.v1",
    "request_id": "req-1",
    "user_id": 123456789012345678,
    "model_id": "mnist_resnet18_v1",
    "epochs": 1,
    "batch_size": 256,
    "lr": 0.0015,
    "seed": 42,
    "augment": True,
    "notes": "requested via /train",
}


def job(**changes: object) -> dict[str, object]:
    return {**VALID_JOB, **changes}


def test_valid_job_and_defaults_are_the_train_commands() -> None:
    parsed = DigitsTrainJobV1.model_validate(VALID_JOB)
    assert parsed.user_id == 123456789012345678
    minimal = DigitsTrainJobV1(request_id="r", user_id=0)
    assert (minimal.model_id, minimal.epochs, minimal.batch_size, minimal.lr, minimal.seed, minimal.augment,
            minimal.notes) == ("mnist_resnet18_v1", 1, 256, 0.0015, 42, True, "requested via /train")
    assert minimal.type == "digits.train.v1"


def test_job_round_trips_through_json() -> None:
    parsed = DigitsTrainJobV1.model_validate(VALID_JOB)
    assert DigitsTrainJobV1.model_validate_json(parsed.model_dump_json()) == parsed
    assert json.loads(parsed.model_dump_json()) == VALID_JOB


@pytest.mark.parametrize(
    "changes",
    [
        {"epochs": 1}, {"epochs": 100}, {"batch_size": 1}, {"batch_size": 4096}, {"lr": 1.0}, {"lr": 1e-6},
        {"lr": 1}, {"seed": -(2**31)}, {"seed": 2**32 - 1}, {"notes": None}, {"notes": "x" * 500},
        {"user_id": 0}, {"user_id": 2**64 - 1}, {"request_id": "r" * 64}, {"model_id": "a"},
        {"model_id": "m" * 64}, {"model_id": "0.v-1_x"}, {"augment": False},
    ],
)
def test_job_accepts_edges(changes: dict[str, object]) -> None:
    for parsed in (DigitsTrainJobV1.model_validate(job(**changes)),
                   DigitsTrainJobV1.model_validate_json(json.dumps(job(**changes)))):
        assert {name: getattr(parsed, name) for name in changes} == changes


@pytest.mark.parametrize(
    "changes",
    [
        {"type": "digits.train.v2"}, {"type": "other"},
        {"request_id": ""}, {"request_id": "r" * 65}, {"request_id": 5},
        {"user_id": -1}, {"user_id": 2**64}, {"user_id": "123"}, {"user_id": True}, {"user_id": 1.0},
        {"model_id": ""}, {"model_id": "../x"}, {"model_id": "a/b"}, {"model_id": "Upper"},
        {"model_id": "_leading"}, {"model_id": "m" * 65}, {"model_id": ".hidden"},
        {"epochs": 0}, {"epochs": 101}, {"epochs": "3"}, {"epochs": True}, {"epochs": 1.5},
        {"batch_size": 0}, {"batch_size": 4097},
        {"lr": 0}, {"lr": -0.1}, {"lr": 1.5}, {"lr": "0.01"}, {"lr": True},
        {"seed": 2**32}, {"seed": -(2**31) - 1}, {"seed": "42"},
        {"augment": 1}, {"augment": "true"}, {"augment": None},
        {"notes": "x" * 501}, {"notes": 3},
        {"unexpected": 1},
    ],
)
def test_job_refuses(changes: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DigitsTrainJobV1.model_validate(job(**changes))
    with pytest.raises(ValidationError):
        DigitsTrainJobV1.model_validate_json(json.dumps(job(**changes)))


@pytest.mark.parametrize("missing", ["request_id", "user_id"])
def test_job_requires_ids(missing: str) -> None:
    payload = dict(VALID_JOB)
    del payload[missing]
    with pytest.raises(ValidationError):
        DigitsTrainJobV1.model_validate(payload)


IDS: dict[str, object] = {"request_id": "req-1", "user_id": 7, "model_id": "mnist_resnet18_v1", "job_id": "job-1",
                          "run_id": "run-1"}
BATCH: dict[str, object] = {
    **IDS, "epoch": 1, "total_epochs": 2, "batch": 20, "total_batches": 100, "batch_loss": 0.4, "batch_acc": 0.875,
    "avg_loss": 0.6, "samples_per_sec": 900.5, "main_rss_mb": 812, "workers_rss_mb": 0, "worker_count": 0,
    "cgroup_usage_mb": 2048, "cgroup_limit_mb": 8192, "cgroup_pct": 25.0, "anon_mb": 900, "file_mb": 1100,
}


def test_events_round_trip_as_compact_json_with_ids_and_ts() -> None:
    events: list[TrainEventModel] = [
        TrainStartedV1.model_validate({**IDS, "total_epochs": 1}),
        TrainStartedV1.model_validate({**IDS, "total_epochs": 2, "device": "cpu", "batch_size": 256, "augment": True,
                                       "aug_rotate": 10.0, "aug_translate": 2.0, "noise_prob": 0.0, "dots_prob": 0.0,
                                       "cpu_cores": 2, "optimal_threads": 2, "memory_mb": 8192,
                                       "optimal_workers": 0}),
        TrainBatchV1.model_validate(BATCH),
        TrainEpochV1.model_validate({**IDS, "epoch": 1, "total_epochs": 2, "train_loss": 0.5, "val_acc": 0.98,
                                     "time_s": 61.2}),
        TrainBestV1.model_validate({**IDS, "epoch": 1, "val_acc": 0.98}),
        TrainArtifactV1.model_validate({**IDS, "path": "/data/artifacts/m/v1"}),
        TrainUploadV1.model_validate({**IDS, "status": 200, "model_bytes": 44_800_000, "manifest_bytes": 900}),
        TrainPruneV1.model_validate({**IDS, "deleted_count": 2}),
        TrainProgressV1.model_validate({**IDS, "epoch": 1, "total_epochs": 1, "batch": 10, "total_batches": 100,
                                        "loss": 0.5, "samples_per_sec": 140.0, "pct": 10.0}),
        TrainCompletedV1.model_validate({**IDS, "val_acc": 0.99, "test_acc": 0.992, "version": "v1",
                                         "activated": True}),
        TrainFailedV1.model_validate({**IDS, "error_kind": "system", "message": "upload failed"}),
    ]
    for event in events:
        raw = dump_event(event)
        assert " " not in raw.replace("upload failed", "")
        decoded = json.loads(raw)
        assert decoded["type"].startswith("digits.train.") and decoded["type"].endswith(".v1")
        assert {k: decoded[k] for k in IDS} == IDS
        assert datetime.fromisoformat(decoded["ts"]).tzinfo is not None
        assert parse_event(raw) == event
        assert parse_event(raw.encode()) == event


@pytest.mark.parametrize(
    "raw",
    [
        '{"type": "digits.train.unknown.v1", "request_id": "r", "user_id": 1, "model_id": "m", "job_id": "j"}',
        '{"type": "digits.train.failed.v1", "request_id": "r", "user_id": 1, "model_id": "m", "job_id": "j",'
        ' "error_kind": "oops", "message": "x"}',
        '{"type": "digits.train.progress.v1", "request_id": "r", "user_id": 1, "model_id": "m", "job_id": "j",'
        ' "epoch": 1, "total_epochs": 1, "batch": 1, "total_batches": 1, "loss": 1.0, "samples_per_sec": 1.0,'
        ' "pct": 101.0}',
        "not json",
        # The bot's JSON types, exactly: an int is not 1.0 or "1", a number is not a string, a bool is not 1.
        json.dumps({**BATCH, "type": "digits.train.batch.v1", "epoch": 1.0}),
        json.dumps({**BATCH, "type": "digits.train.batch.v1", "main_rss_mb": "812"}),
        json.dumps({**BATCH, "type": "digits.train.batch.v1", "batch_loss": "0.4"}),
        json.dumps({**{k: v for k, v in BATCH.items() if k != "cgroup_pct"}, "type": "digits.train.batch.v1"}),
        json.dumps({**IDS, "type": "digits.train.started.v1", "total_epochs": 1, "augment": 1}),
        json.dumps({**IDS, "type": "digits.train.started.v1"}),  # total_epochs is required
        json.dumps({**IDS, "type": "digits.train.upload.v1", "status": "200", "model_bytes": 1,
                    "manifest_bytes": 1}),
        json.dumps({**IDS, "type": "digits.train.completed.v1", "val_acc": 0.9, "test_acc": 0.9, "version": "v",
                    "activated": True, "run_id": 5}),
    ],
)
def test_bad_events_are_refused(raw: str) -> None:
    with pytest.raises(ValidationError):
        parse_event(raw)


def manifest(**changes: object) -> bytes:
    body: dict[str, object] = {
        "schema_version": "v1.1",
        "model_id": "mnist_resnet18_v1",
        "arch": "resnet18_1ch",
        "n_classes": 10,
        "version": "20261128T220000Z-ab12cd",
        "created_at": datetime.now(UTC).isoformat(),
        "preprocess_hash": PREPROCESS_HASH,
        "val_acc": 0.991,
        "temperature": 1.0,
        "test_acc": 0.9925,
        "epochs": 1,
        "some_future_field": "ignored",
    }
    body.update(changes)
    return json.dumps(body).encode()


def test_manifest_valid() -> None:
    parsed = ManifestV1_1.model_validate_json(manifest())
    assert parsed.schema_version == "v1.1" and parsed.preprocess_hash == PREPROCESS_HASH


@pytest.mark.parametrize(
    "changes",
    [
        {"schema_version": "v1.0"}, {"schema_version": "v1.2"}, {"schema_version": None},
        {"model_id": "../etc"}, {"preprocess_hash": "abc"}, {"preprocess_hash": "G" * 64},
        {"val_acc": 1.5}, {"val_acc": "0.9"}, {"n_classes": "10"}, {"temperature": 0},
        {"version": "../../x"}, {"version": ""}, {"created_at": "yesterday"},
    ],
)
def test_manifest_refuses(changes: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        ManifestV1_1.model_validate_json(manifest(**changes))
