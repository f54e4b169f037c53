"""`GET /v1/jobs/{job_id}`: a training job's status, progress, and result or error."""

from __future__ import annotations

from fastapi import APIRouter

from app.deps import RedisDep, SettingsDep
from app.errors import ApiError
from app.queue import JobView, read_job, require_connection

router = APIRouter(tags=["training"])


@router.get("/v1/jobs/{job_id}", response_model=JobView)
def get_job(job_id: str, connection: RedisDep, settings: SettingsDep) -> JobView:
    view = read_job(require_connection(connection), settings.rq.queue, job_id)
    if view is None:
        raise ApiError(404, "not_found", f"no training job with id {job_id!r} (unknown or expired)")
    return view
