"""`POST /v1/train`: enqueue a training job, optionally overriding the `/train` defaults."""

from __future__ import annotations

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.auth import ApiKeyDep, key_before_body
from app.body_limit import JSON_MAX_BYTES, body_limit_route
from app.contracts import DigitsTrainJobV1, describe_errors
from app.deps import RedisDep, SettingsDep
from app.errors import ApiError, documented_errors
from app.estimate import JobTooLongError
from app.observability import current_request_id, new_request_id
from app.queue import enqueue_train, require_connection

# The key is checked and the body capped before a byte of it is read (app.body_limit).
router = APIRouter(tags=["training"], route_class=body_limit_route(JSON_MAX_BYTES, before_body=key_before_body))


class TrainRequest(BaseModel):
    """Overrides of the job payload; every field is optional and checked against DigitsTrainJobV1's rules."""

    model_config = ConfigDict(extra="forbid", strict=True)

    user_id: int | None = Field(default=None, description="who asked (0 for HTTP callers)")
    model_id: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    augment: bool | None = None
    notes: str | None = None


class TrainAccepted(BaseModel):
    request_id: str
    job_id: str
    status_url: str


_ERRORS = documented_errors({
    401: "`unauthorized`: X-Api-Key missing or wrong (checked before the body is read)",
    413: "`too_large`: the body is over 64 KiB (refused from Content-Length, or at the first byte over)",
    422: "`invalid_request`: a field is wrong; `job_too_long`: estimated to run past the job timeout (the message "
         "says how many epochs fit)",
    503: "`training_unavailable`: Redis not configured or not reachable",
})


@router.post("/v1/train", status_code=status.HTTP_202_ACCEPTED, response_model=TrainAccepted, responses=_ERRORS)
def create_training_job(
    _: ApiKeyDep, connection: RedisDep, settings: SettingsDep, body: TrainRequest | None = None
) -> TrainAccepted:
    """Queue a digits.train.v1 job; 422 `job_too_long` when it is estimated to run past the job timeout;
    503 `training_unavailable` when Redis is not configured or not reachable."""
    overrides = body.model_dump(exclude_unset=True) if body is not None else {}
    request_id = current_request_id() or new_request_id()
    try:
        job = DigitsTrainJobV1.model_validate({**overrides, "request_id": request_id,
                                               "user_id": overrides.get("user_id", 0) or 0})
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", "invalid training request: " + describe_errors(exc.errors())) from exc
    try:
        job_id = enqueue_train(require_connection(connection), settings.rq.queue, job, train=settings.train)
    except JobTooLongError as exc:
        raise ApiError(422, "job_too_long", str(exc)) from exc
    return TrainAccepted(request_id=request_id, job_id=job_id, status_url=f"/v1/jobs/{job_id}")
