"""Will a training job finish within its time limit? Estimated at enqueue from the workers' own measured speed.

After each job a worker records how fast it trained (images x epochs per second, evaluation included),
per device and network, in one Redis hash per queue. The newest record speaks for the workers now
deployed; before the first job, `TRAIN__ESTIMATE_IMAGES_PER_S` stands in. A job whose estimate exceeds
the job timeout is refused with the reason and the most epochs that would fit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Final

import redis
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.contracts import JOB_TIMEOUT_S, DigitsTrainJobV1
from config.settings import TrainSettings

MNIST_TRAIN_SIZE: Final = 60_000  # training images before the validation split is held out
JOB_OVERHEAD_S: Final = 300.0  # preparing the data, saving, uploading: the part that does not grow with epochs


def throughput_key(queue: str) -> str:
    """Redis hash of the workers' measurements on `queue`: field "<device>|<arch>" -> Throughput JSON."""
    return f"digits:{queue}:throughput"


class Throughput(BaseModel):
    """One kind of worker's measured training speed, as recorded after a job."""

    model_config = ConfigDict(frozen=True)

    device: str
    arch: str
    images_per_s: float = Field(gt=0, description="images x epochs per second, evaluation included")
    epoch_images: int = Field(ge=1, description="images this worker trains per epoch (TRAIN__LIMIT included)")
    measured_at: float = Field(default_factory=time.time, description="Unix seconds")

    @property
    def field(self) -> str:
        return f"{self.device}|{self.arch}"


@dataclass(frozen=True)
class Estimate:
    seconds: float
    images_per_s: float
    epoch_images: int
    basis: str  # where the speed comes from, for the message

    def max_epochs(self, limit_s: float) -> int:
        return max(0, math.floor((limit_s - JOB_OVERHEAD_S) * self.images_per_s / self.epoch_images))


class JobTooLongError(Exception):
    """The job would run past its time limit. The message is fit for users."""


def latest_throughput(connection: redis.Redis, queue: str) -> Throughput | None:
    """The newest valid measurement on `queue`, or None before any worker finished a job."""
    records = connection.hgetall(throughput_key(queue))
    found: list[Throughput] = []
    for raw in records.values() if isinstance(records, dict) else ():
        try:
            found.append(Throughput.model_validate_json(raw))
        except ValidationError:
            continue
    return max(found, key=lambda t: t.measured_at, default=None)


def estimate(job: DigitsTrainJobV1, measured: Throughput | None, train: TrainSettings) -> Estimate:
    if measured is not None:
        rate, images = measured.images_per_s, measured.epoch_images
        basis = f"measured on {measured.device}, {measured.arch}"
    else:
        rate = train.estimate_images_per_s
        images = MNIST_TRAIN_SIZE - min(train.val_size, MNIST_TRAIN_SIZE - 1)
        images = min(images, train.limit) if train.limit is not None else images
        basis = "assumed before any job was measured (TRAIN__ESTIMATE_IMAGES_PER_S)"
    return Estimate(seconds=JOB_OVERHEAD_S + job.epochs * images / rate, images_per_s=rate, epoch_images=images,
                    basis=basis)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def check_fits(connection: redis.Redis, queue: str, job: DigitsTrainJobV1, train: TrainSettings) -> Estimate:
    """The job's estimate; raises JobTooLongError when it would exceed the job timeout."""
    guess = estimate(job, latest_throughput(connection, queue), train)
    if guess.seconds <= JOB_TIMEOUT_S:
        return guess
    fits = guess.max_epochs(JOB_TIMEOUT_S)
    advice = f"at most {fits} epoch{'s' if fits != 1 else ''} fit" if fits else "not even one epoch fits"
    plural = "s" if job.epochs != 1 else ""
    raise JobTooLongError(
        f"{job.epochs} epoch{plural} would take about {_hours(guess.seconds)} "
        f"({guess.epoch_images:,} images per epoch at {guess.images_per_s:,.0f} images/s, {guess.basis}), "
        f"past the {_hours(JOB_TIMEOUT_S)} limit of a training job; {advice}."
    )
