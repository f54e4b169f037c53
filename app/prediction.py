"""What reading a digit gives and how it fails, without the model behind it (no torch, no web framework).

The Discord `/read` and the HTTP API depend on `DigitReader`; `app.serving.ModelServer` is the one
that answers. Besides the errors below, a reader raises `app.preprocess.PreprocessError` for an
image it cannot use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Protocol

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel

NOT_READY_MESSAGE: Final = (
    "no model is loaded yet. Get one by running `make run` (it trains a first model), by POST /v1/train "
    "(X-Api-Key) and waiting for the job, or by uploading one to POST /v1/admin/models/upload"
)


class ModelNotReadyError(Exception):
    """No model is loaded yet; the message says how to get one."""

    def __init__(self, message: str = NOT_READY_MESSAGE) -> None:
        super().__init__(message)
        self.message = message


class PredictionTimeoutError(Exception):
    def __init__(self, timeout_s: float) -> None:
        self.message = f"the prediction took longer than {timeout_s:g} s"
        super().__init__(self.message)


class ReadOverloadedError(Exception):
    """As many reads as the service admits are already waiting or running; try again after `retry_after_s`."""

    def __init__(self, retry_after_s: int) -> None:
        self.retry_after_s = retry_after_s
        self.message = f"too many reads in progress; try again in {retry_after_s} s"
        super().__init__(self.message)


class Reading(BaseModel):
    """A read's answer, as `POST /v1/read` returns it (app.routes.read adds its own fields) and `/read` tells it."""

    digit: int
    confidence: float
    probs: list[float]
    model_id: str
    version: str
    uncertain: bool


@dataclass(frozen=True, slots=True)
class Prediction:
    reading: Reading
    preview: npt.NDArray[np.uint8]  # 28x28, what the model saw


class DigitReader(Protocol):
    async def read_digit(self, data: bytes, *, invert: bool | None = None) -> Prediction:
        """Image bytes -> Prediction; raises PreprocessError, ModelNotReadyError, PredictionTimeoutError,
        ReadOverloadedError."""
        ...
