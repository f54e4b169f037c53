"""`GET /v1/jobs/{job_id}`: a training job's status, progress, and result or error."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter
from pydantic import BaseModel

from app.deps import ServicesDep
from app.errors import ApiError
from app.queue import JobState, TrainingUnavailableError, read_job

router = APIRouter(tags=["training"])


class JobStatusResponse(BaseModel):
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


@router.get("/v1/jobs/{job_id}", response_model=JobStatusResponse)
def get_job(job_id: str, services: ServicesDep) -> JobStatusResponse:
    try:
        view = read_job(services, job_id)
    except TrainingUnavailableError as exc:
        raise ApiError(503, "training_unavailable", str(exc)) from exc
    if view is None:
        raise ApiError(404, "not_found", f"no training job with id {job_id!r} (unknown or expired)")
    return JobStatusResponse(
        job_id=view.job_id, status=view.status, stage=view.stage, request_id=view.request_id,
        user_id=view.user_id, model_id=view.model_id, progress=view.progress, result=view.result,
        error=view.error, enqueued_at=view.enqueued_at, started_at=view.started_at, ended_at=view.ended_at,
    )
