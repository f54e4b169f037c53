"""Crash injection for the atomic-write tests: the process "dies" at a chosen step of a file-system change.

A crash cannot be ordered from a real process at an exact point cheaply, so the death is simulated
in-process, on the real file system: every change the code makes under a directory is a step (the
first write to each file, which dies half-way and leaves what it had written; a rename or replace; a
mkdir; an unlink or rmdir). At the chosen step a `Crash` is raised, and from then on every change
anywhere fails the same way: a dead process changes nothing more, not even in its `finally` blocks.
fsync is not a step: it changes nothing a restarted process can see (what it guards, a power cut,
is beyond an in-process test), so dying just before one leaves the same state as dying just after
the change before it.
"""

from __future__ import annotations

import builtins
import contextlib
import io
import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import pytest


class Crash(BaseException):
    """The process dying here. A BaseException, so no `except Exception` in the code under test outlives it."""


_WRITE_MODES = frozenset("wax+")


class Faults:
    """Counts the changes under `root` and dies at change number `crash_at` (1-based)."""

    def __init__(self, root: Path, crash_at: int) -> None:
        self.root = root.resolve()
        self.crash_at = crash_at
        self.steps: list[str] = []
        self.dead = False

    def covers(self, path: object) -> bool:
        if not isinstance(path, str | bytes | os.PathLike):
            return False
        return Path(os.fsdecode(path)).resolve().is_relative_to(self.root)

    def step(self, what: str) -> bool:
        """Record a change about to happen; True when the process dies at it."""
        if self.dead:
            raise Crash(f"already dead: {what}")
        self.steps.append(what)
        if len(self.steps) == self.crash_at:
            self.dead = True
            return True
        return False

    def before(self, what: str, path: object) -> None:
        """A change that happens whole or not at all: die before it, at its step."""
        if self.dead or (self.covers(path) and self.step(what)):
            raise Crash(what)

    @contextlib.contextmanager
    def installed(self) -> Iterator[Faults]:
        real_open = io.open
        real = {name: getattr(os, name) for name in ("replace", "rename", "mkdir", "unlink", "remove", "rmdir")}

        def fake_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
            writing = bool(_WRITE_MODES & set(mode))
            if writing and self.dead:
                raise Crash(f"already dead: open {file}")
            f = real_open(file, mode, *args, **kwargs)
            return _Watched(f, self, self._name(file)) if writing and self.covers(file) else f

        def two_paths(name: str) -> Callable[..., None]:
            def change(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
                self.before(f"{name} {self._name(src)} -> {self._name(dst)}", dst)
                real[name](src, dst, *args, **kwargs)
            return change

        def one_path(name: str) -> Callable[..., None]:
            def change(path: Any, *args: Any, **kwargs: Any) -> None:
                self.before(f"{name} {self._name(path)}", path)
                real[name](path, *args, **kwargs)
            return change

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(io, "open", fake_open)
            mp.setattr(builtins, "open", fake_open)
            for name in ("replace", "rename"):
                mp.setattr(os, name, two_paths(name))
            for name in ("mkdir", "unlink", "remove", "rmdir"):
                mp.setattr(os, name, one_path(name))
            yield self

    def _name(self, path: object) -> str:
        if not isinstance(path, str | bytes | os.PathLike):
            return repr(path)
        p = Path(os.fsdecode(path)).resolve()
        return str(p.relative_to(self.root)) if p.is_relative_to(self.root) else str(p)


class _Watched:
    """A file opened for writing under the watched root: its first write is a step, and may die half-way."""

    def __init__(self, f: IO[Any], faults: Faults, name: str) -> None:
        self._f = f
        self._faults = faults
        self._name = name
        self._written = False

    def write(self, data: Any) -> int:
        if self._faults.dead:
            raise Crash(f"already dead: write {self._name}")
        if not self._written:
            self._written = True
            if self._faults.step(f"write {self._name}"):
                self._f.write(data[: len(data) // 2])
                self._f.flush()
                raise Crash(f"write {self._name}")
        written: int = self._f.write(data)
        return written

    def __enter__(self) -> _Watched:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def crash_at_every_step(
    pristine: Path, work: Path, operation: Callable[[Path], object], after_crash: Callable[[Path, str], None]
) -> list[str]:
    """Run `operation` on a fresh copy of `pristine`, dying at step 1, then 2, ... until it completes.

    `after_crash(copy, step)` inspects each crashed copy (as a restart would find it). Returns the
    steps of the complete run, so the caller can check the crashes covered what it meant to.
    """
    for crash_at in itertools.count(1):
        copy = work / f"crash-{crash_at}"
        shutil.copytree(pristine, copy)
        faults = Faults(copy, crash_at)
        try:
            with faults.installed():
                operation(copy)
        except Crash:
            after_crash(copy, faults.steps[-1])
            shutil.rmtree(copy)
            continue
        return faults.steps
    raise AssertionError("unreachable")
