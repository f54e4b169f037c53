"""What anyone may see of a training job: its progress and outcome, never who asked or where files went.

`GET /v1/jobs/{id}` without the admin key and `GET /v1/jobs/{id}/events` answer this view; the admin key
sees the whole `JobView` (user id, request id, artifacts' path, upload notes, the error's message).
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict

from app.contracts import GateDecision, TrainProgressV1
from app.queue import JobState, JobView

# The progress event's own fields (epoch, batch, loss, ...), without the ids every event carries.
_PROGRESS_FIELDS: Final = frozenset(TrainProgressV1.model_fields) - {
    "type", "ts", "request_id", "user_id", "model_id", "job_id", "run_id"
}


class PublicJobView(BaseModel):
    """A job as everyone sees it: status, stage, progress, and at the end accuracies, version, activation
    (and why: the promotion gate's decision and figures)."""

    model_config = ConfigDict(frozen=True)

    job_id: str
    status: JobState
    stage: str | None
    model_id: str | None
    progress: dict[str, object] | None
    val_acc: float | None
    test_acc: float | None
    version: str | None
    activated: bool | None
    # The promotion gate: why the model went live or not, with both accuracies on the API's gate set.
    gate_decision: GateDecision | None = None
    gate_candidate_acc: float | None = None
    gate_active_acc: float | None = None
    activation_reason: str | None = None
    error_kind: Literal["user", "system"] | None
    enqueued_at: datetime | None
    started_at: datetime | None
    ended_at: datetime | None

    @property
    def ended(self) -> bool:
        return self.status in ("finished", "failed")


def _float(value: object) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _decision(value: object) -> GateDecision | None:
    return value if value == "passed" or value == "refused" or value == "forced" else None


def public_view(view: JobView) -> PublicJobView:
    result = view.result or {}
    version, activated = result.get("version"), result.get("activated")
    kind = (view.error or {}).get("kind")
    progress = None if view.progress is None else {k: v for k, v in view.progress.items() if k in _PROGRESS_FIELDS}
    return PublicJobView(
        job_id=view.job_id,
        status=view.status,
        stage=view.stage,
        model_id=view.model_id,
        progress=progress,
        val_acc=_float(result.get("val_acc")),
        test_acc=_float(result.get("test_acc")),
        version=version if isinstance(version, str) else None,
        activated=activated if isinstance(activated, bool) else None,
        gate_decision=_decision(result.get("gate_decision")),
        gate_candidate_acc=_float(result.get("gate_candidate_acc")),
        gate_active_acc=_float(result.get("gate_active_acc")),
        activation_reason=reason if isinstance(reason := result.get("activation_reason"), str) else None,
        error_kind="user" if kind == "user" else "system" if view.error is not None else None,
        enqueued_at=view.enqueued_at,
        started_at=view.started_at,
        ended_at=view.ended_at,
    )
