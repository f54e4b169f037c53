"""The legacy RQ target `handwriting_ai.jobs.digits.process_train_job`: the same job as ours."""

from __future__ import annotations

from worker.job import process_train_job

__all__ = ["process_train_job"]
