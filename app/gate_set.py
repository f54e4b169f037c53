"""The promotion gate's set: MNIST *test* digits drawn deterministically (seeded), half as they ship and
half as photo-like renders of them (`app.photo`), every image through the real preprocessing
(`app.preprocess`), as `/v1/read` would see it. Built once per DATA_DIR and cached there as numpy arrays
(no pickle) with their sha256; a damaged cache is rebuilt. Torch-free.

Building 1,000 images costs some 10 CPU-seconds of rendering and preprocessing, most of it Python and
numpy holding the GIL. In the API's own process that would stall reads (their event loop and preprocessing
threads need the GIL) by up to ~150 ms at a time, so a set of more than `IN_PROCESS_MAX` images is built
in a child process of its own (spawned, at the gate's low priority), which writes the cache; the API only
reads the finished file back and checks it. Small sets (tests) are built in the calling thread.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import multiprocessing
import os
import subprocess
import sys
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from app.files import write_atomic
from app.mnist import FULL_TEST, I64, SIDE, U8, load_test, mnist_pickle_path
from app.photo import CONDITIONS, RENDERER_VERSION, render_photo
from app.preprocess import PREPROCESS_HASH, PreprocessError, preprocess, preprocess_gray

log = logging.getLogger("app.gate")

GATE_RECIPE: Final = "gate-v2"  # change it when the way the set is drawn changes: a new set, new scores
GATE_SEED: Final = 1129
# The photo-like half is rendered at most this many px a side: still over what preprocessing reduces every
# image to (WORK_SIDE, 256), so each photo goes through the same reduction as a user's, at a fifth of the
# cost of phone-sized renders.
GATE_PHOTO_SIDE: Final = 320
GATE_NICE: Final = 10  # the gate's CPU priority: about a tenth of a core that reads keep busy
IN_PROCESS_MAX: Final = 200  # up to this many images (about a second of work) no process is worth starting


@dataclass(frozen=True)
class GateSet:
    images: U8  # (N, 28, 28) preprocessed, white ink on black: what the network sees
    labels: I64
    key: str  # names this set: its recipe, size and preprocessing


def gate_key(size: int) -> str:
    recipe = f"{GATE_RECIPE}|size={size}|preprocess={PREPROCESS_HASH}|photo={photo_recipe()}|side={GATE_PHOTO_SIDE}"
    return hashlib.sha256(recipe.encode("utf-8")).hexdigest()[:16]


def photo_recipe() -> str:
    """What the photo-like half of the set is made with (part of the set's key)."""
    return f"app.photo v{RENDERER_VERSION}: {','.join(CONDITIONS)}"


def photo_view(digit: U8, index: int) -> U8 | None:
    """A photo-like render of a raw MNIST digit (`app.photo`, the conditions taken in turn, its own seeded
    rng) read back through the real preprocessing, as `/v1/read` would see the file; None when
    preprocessing refuses it (the plain digit then takes its place)."""
    rng = np.random.default_rng([GATE_SEED, index])
    data = render_photo(digit, CONDITIONS[index % len(CONDITIONS)], rng, max_side=GATE_PHOTO_SIDE)
    try:
        return preprocess(data).preview
    except PreprocessError:
        return None


def plain_view(digit: U8) -> U8:
    try:
        return preprocess_gray(digit, invert=False).preview
    except PreprocessError:
        return digit  # as the training data does: the network sees what /v1/read would refuse


class GateStoppedError(Exception):
    """The API is shutting down: a set being built is abandoned (nothing is cached)."""


def build_gate_set(size: int, *, stop: threading.Event | None = None) -> GateSet:
    """Draw `size` test digits (seeded) and preprocess them; the second half as photo-like renders.
    `stop` abandons the build (GateStoppedError)."""
    jobs, labels = _draw(size)
    images = []
    for job in jobs:
        if stop is not None and stop.is_set():
            raise GateStoppedError()
        images.append(_view(job))
    return _assembled(images, labels, size)


def _draw(size: int) -> tuple[list[tuple[U8, int, bool]], I64]:
    """The seeded picks: (digit, index in the set, rendered as a photo?) each, and their labels."""
    test_x, test_y = load_test()
    picks = np.random.default_rng(GATE_SEED).permutation(FULL_TEST)[: min(size, FULL_TEST)]
    half = len(picks) // 2
    jobs = [(test_x[index], n, n >= half) for n, index in enumerate(picks)]
    return jobs, np.asarray([int(test_y[index]) for index in picks], dtype=np.int64)


def _assembled(images: list[U8], labels: I64, size: int) -> GateSet:
    return GateSet(np.stack(images).astype(np.uint8), labels, gate_key(size))


def _view(job: tuple[U8, int, bool]) -> U8:
    """One image of the set: the `index`th digit as a photo-like render when `photo`, else as it ships."""
    digit, index, photo = job
    view = photo_view(digit, index) if photo else None
    return view if view is not None else plain_view(digit)


def _digest(images: U8, labels: I64) -> str:
    return hashlib.sha256(images.tobytes() + labels.tobytes()).hexdigest()


def save_gate_set(path: Path, gate_set: GateSet) -> None:
    buf = io.BytesIO()
    checksum = np.frombuffer(bytes.fromhex(_digest(gate_set.images, gate_set.labels)), dtype=np.uint8)
    np.savez(buf, images=gate_set.images, labels=gate_set.labels, sha256=checksum)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, buf.getvalue())


def load_gate_set(path: Path, key: str) -> GateSet | None:
    """The cached set, or None when it is missing, unreadable or fails its checksum."""
    try:
        with np.load(path, allow_pickle=False) as z:
            images, labels, checksum = z["images"], z["labels"], z["sha256"]
    except FileNotFoundError:
        return None
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as exc:
        log.warning("ignoring unreadable gate set %s: %s", path, exc)
        return None
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE) or len(labels) != len(images):
        log.warning("ignoring misshapen gate set %s", path)
        return None
    if checksum.dtype != np.uint8 or checksum.tobytes().hex() != _digest(images, labels.astype(np.int64)):
        log.warning("ignoring gate set %s: its checksum does not match its content", path)
        return None
    return GateSet(images, labels.astype(np.int64), key)


def cached_or_built(path: Path, size: int, *, workers: int, stop: threading.Event) -> GateSet:
    """The set cached at `path`, or a new one built and cached there: over IN_PROCESS_MAX images by a child
    process on `workers` forked workers of its own, else in this thread (this process never forks)."""
    key = gate_key(size)
    cached = load_gate_set(path, key)
    if cached is not None:
        return cached
    mnist_pickle_path()  # no MNIST: say so here, with what to run, rather than from a child's exit code
    if size > IN_PROCESS_MAX:
        built = _build_in_child(path, size, workers, stop)
        if built is not None:
            return built
        log.warning("building the gate set in its own process failed; building it here instead")
    gate_set = build_gate_set(size, stop=stop)
    try:
        save_gate_set(path, gate_set)
    except OSError as exc:  # a full disk costs a rebuild next start, not the decision
        log.warning("could not cache the gate set at %s: %s", path, exc)
    return gate_set


def _build_in_child(path: Path, size: int, workers: int, stop: threading.Event) -> GateSet | None:
    """Build and cache the set in a child process (`python -m app.gate_set`); the set read back from the
    cache, or None when the child failed."""
    root = str(Path(__file__).resolve().parent.parent)  # where `app` is importable from, wherever we run
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "app.gate_set", str(path), str(size), str(workers)]
    with subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL) as child:
        while child.poll() is None:
            if stop.is_set():
                child.kill()
                child.wait()
                raise GateStoppedError()
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(0.2)
    if child.returncode != 0:
        log.warning("the gate set's process exited with %s", child.returncode)
        return None
    return load_gate_set(path, gate_key(size))  # checked like any cache: the child is trusted no further


def _main(argv: list[str]) -> None:
    """`python -m app.gate_set PATH SIZE WORKERS`: build the set at the gate's priority, on WORKERS forked
    processes (safe here: this process has no other threads), the same set `build_gate_set` makes, and
    cache it at PATH."""
    path, size, workers = Path(argv[0]), int(argv[1]), int(argv[2])
    with contextlib.suppress(OSError):
        os.setpriority(os.PRIO_PROCESS, 0, GATE_NICE)
    jobs, labels = _draw(size)
    with multiprocessing.get_context("fork").Pool(max(1, workers)) as pool:
        images = pool.map(_view, jobs, chunksize=16)
    save_gate_set(path, _assembled(images, labels, size))


if __name__ == "__main__":
    _main(sys.argv[1:])
