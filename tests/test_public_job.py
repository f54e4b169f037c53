"""The one definition of what anyone may see of a job (app.public_job): a failed job's internals stay hidden."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from app.public_job import PublicJobView, public_view
from app.queue import JobView

INTERNALS = ("http://10.0.0.5:8000", "/data/artifacts", "req-secret-1", "4242", "Traceback", "notes")


def failed_job() -> JobView:
    return JobView(
        job_id="j1", status="failed", stage="uploading", request_id="req-secret-1", user_id=4242,
        model_id="mnist_resnet18_v1",
        progress={"epoch": 1, "total_epochs": 1, "batch": 9, "total_batches": 9, "loss": 0.2,
                  "samples_per_sec": 900.0, "pct": 100.0, "request_id": "req-secret-1", "user_id": 4242,
                  "artifacts_dir": "/data/artifacts/x", "notes": "private"},
        result={"val_acc": 0.97, "test_acc": 0.96, "artifacts_dir": "/data/artifacts/x",
                "upload_url": "http://10.0.0.5:8000/v1/admin/models/upload"},
        error={"kind": "system", "message": "upload to http://10.0.0.5:8000 failed: /data/artifacts/x",
               "traceback": "Traceback (most recent call last): ..."},
        enqueued_at=datetime(2026, 11, 29, tzinfo=UTC), started_at=None, ended_at=None,
    )


def test_a_failed_job_shows_status_stage_progress_and_accuracies_only() -> None:
    view = public_view(failed_job())
    shown = view.model_dump_json()
    assert not [secret for secret in INTERNALS if secret in shown], shown
    assert (view.status, view.stage, view.error_kind) == ("failed", "uploading", "system")
    assert (view.val_acc, view.test_acc) == (0.97, 0.96)
    assert view.progress is not None and set(view.progress) == {
        "epoch", "total_epochs", "batch", "total_batches", "loss", "samples_per_sec", "pct"}
    assert set(json.loads(shown)) == set(PublicJobView.model_fields)
