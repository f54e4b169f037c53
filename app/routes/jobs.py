"""`GET /v1/jobs/{job_id}`: a training job's status, progress, and result or error.

Everyone sees the public view (app.public_job); the admin key also sees who asked and where files went.
"""

from __future__ import annotations

import redis
from fastapi import APIRouter

from app.auth import IsAdminDep
from app.deps import RedisDep, SettingsDep
from app.errors import ApiError
from app.public_job import PublicJobView, public_view
from app.queue import JobView, read_job, require_connection

router = APIRouter(tags=["training"])


def find_job(connection: redis.Redis, queue_name: str, job_id: str) -> JobView:
    """The job, or 404 `not_found` (Redis unreachable: TrainingUnavailableError, answered as a 503)."""
    view = read_job(connection, queue_name, job_id)
    if view is None:
        raise ApiError(404, "not_found", f"no training job with id {job_id!r} (unknown or expired)")
    return view


@router.get("/v1/jobs/{job_id}", response_model=JobView | PublicJobView)
def get_job(job_id: str, connection: RedisDep, settings: SettingsDep, admin: IsAdminDep) -> JobView | PublicJobView:
    """The whole job with the admin key (`X-Api-Key`); without it, the public fields only."""
    view = find_job(require_connection(connection), settings.rq.queue, job_id)
    return view if admin else public_view(view)
