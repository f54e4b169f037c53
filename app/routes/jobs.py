"""`GET /v1/jobs/{job_id}`: a training job's status, progress, and result or error."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import RedisDep, SettingsDep
from app.errors import ApiError
from app.queue import NOT_CONFIGURED, JobView, TrainingUnavailableError, read_job

router = APIRouter(tags=["training"])


@router.get("/v1/jobs/{job_id}", response_model=JobView)
def get_job(job_id: str, connection: RedisDep, settings: SettingsDep) -> JobView:
    if connection is None:
        raise ApiError(503, "training_unavailable", NOT_CONFIGURED)
    try:
        view = read_job(connection, settings.rq.queue, job_id)
    except TrainingUnavailableError as exc:
        raise ApiError(503, "training_unavailable", str(exc)) from exc
    if view is None:
        raise ApiError(404, "not_found", f"no training job with id {job_id!r} (unknown or expired)")
    return view
