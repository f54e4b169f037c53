"""The hooks through which a training run tells its watcher how it goes (events for a job, a bar for `digits train`).

Torch-free on import, so the CLI can name it without loading the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from worker.train import EpochReport, Progress
    from worker.upload import UploadResult


@dataclass(frozen=True)
class RunStart:
    """What a run is about to do; `details` are the optional fields of `digits.train.started.v1`."""

    run_id: str
    total_epochs: int
    device: str
    details: dict[str, object]


class RunHooks:
    """What a run tells its watcher, in order; each hook does nothing unless overridden."""

    def stage(self, name: str) -> None:
        pass

    def started(self, total_epochs: int, device: str) -> None:
        pass

    def run_started(self, start: RunStart) -> None:
        self.started(start.total_epochs, start.device)

    def progress(self, progress: Progress) -> None:
        pass

    def epoch(self, report: EpochReport) -> None:
        pass

    def artifact(self, path: Path) -> None:
        pass

    def uploaded(self, result: UploadResult) -> None:
        pass

    def pruned(self, deleted_count: int) -> None:
        pass
