"""How well a model reads our own photo set, over HTTP as a user calls /v1/read: `make bench-quality`.

    python -m bench.quality --model DATA_DIR/artifacts/<model_id>/<version>   # a trained model's folder
    python -m bench.quality --train                 # train the default job first (`digits train`; honours
                                                    # TRAIN__* such as TRAIN__LIMIT), then read with it
    python -m bench.quality --model DIR --tta       # the same with API__TTA=true
    python -m bench.quality --model DIR --direct    # in-process, no HTTP and no preprocess-hash check: the
                                                    # same weights under this checkout's preprocessing

The set (`bench/photo_set.py`, MNIST test digits only) is rendered into --set-dir if it is not there.
A server is started on a free loopback port with an empty DATA_DIR, the model is uploaded through
`POST /v1/admin/models/upload` (refused, like any upload, when its preprocess_hash is not this
service's), and every image is posted to `/v1/read`. Printed: accuracy per part and per condition, the
commonest confusions, the share of answers that are 3 or 8, what `uncertain` flags (wrong answers
flagged, right answers flagged) at the served threshold and at others, and the mean time per read.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final

import httpx

from bench.photo_set import Item, build, load

THRESHOLDS: Final = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


@dataclass(frozen=True)
class Answer:
    item: Item
    digit: int  # -1: the read was refused (the code says why)
    confidence: float
    uncertain: bool
    code: str = ""
    ms: float = 0.0

    @property
    def right(self) -> bool:
        return self.digit == self.item.label


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@contextmanager
def served(model_dir: Path, *, tta: bool) -> Iterator[str]:
    """uvicorn on a free loopback port, empty DATA_DIR, the model uploaded through the admin API."""
    from worker.artifacts import Artifacts
    from worker.upload import upload_artifacts

    key = secrets.token_hex(16)
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as tmp:
        port = _free_port()
        env = {**os.environ, "DATA_DIR": tmp, "LOG_LEVEL": "WARNING", "HANDWRITING_API_KEY": key,
               "API__TTA": "true" if tta else "false", "API__MODEL_POLL_S": "0"}
        env.pop("REDIS_URL", None)
        proc = subprocess.Popen([sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port",
                                 str(port), "--log-level", "warning", "--no-access-log"], env=env)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise SystemExit("the server did not start")
                try:
                    if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)
            manifest = json.loads((model_dir / "manifest.json").read_text())
            artifacts = Artifacts(directory=model_dir, weights_path=model_dir / "model.pt",
                                  manifest_path=model_dir / "manifest.json", manifest=manifest)
            upload_artifacts(artifacts, url, key, attempts=1)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def read_over_http(url: str, set_dir: Path, items: list[Item]) -> list[Answer]:
    answers = []
    with httpx.Client(base_url=url, timeout=60) as client:
        for item in items:
            data = (set_dir / item.file).read_bytes()
            mime = "image/jpeg" if item.file.endswith(".jpg") else "image/png"
            started = time.perf_counter()
            response = client.post("/v1/read", files={"file": (Path(item.file).name, data, mime)})
            ms = (time.perf_counter() - started) * 1000
            body = response.json()
            if response.status_code == 200:
                answers.append(Answer(item, int(body["digit"]), float(body["confidence"]), bool(body["uncertain"]),
                                      ms=ms))
            else:
                answers.append(Answer(item, -1, 0.0, True, code=str(body.get("code")), ms=ms))
    return answers


def read_in_process(model_dir: Path, set_dir: Path, items: list[Item], *, tta: bool,
                    uncertain_below: float) -> list[Answer]:
    """The serving code's preprocessing and forward pass, without HTTP and without the hash check."""
    import torch

    from app.contracts import ManifestV1_1
    from app.inference import forward_probs
    from app.loading import load_candidate
    from app.preprocess import PreprocessError, preprocess

    torch.set_num_threads(1)  # one read at a time, as a lone read is served
    manifest = ManifestV1_1.model_validate_json((model_dir / "manifest.json").read_bytes())
    model = load_candidate(model_dir / "model.pt", manifest)
    answers = []
    for item in items:
        started = time.perf_counter()
        try:
            tensor = preprocess((set_dir / item.file).read_bytes()).tensor
        except PreprocessError as exc:
            answers.append(Answer(item, -1, 0.0, True, code=exc.code))
            continue
        probs = forward_probs(model.net, tensor, manifest.temperature, tta=tta)[0]
        conf, digit = torch.max(probs, dim=0)
        ms = (time.perf_counter() - started) * 1000
        answers.append(Answer(item, int(digit), float(conf), float(conf) < uncertain_below, ms=ms))
    return answers


def train_default_job(out_dir: Path) -> Path:
    """`digits train --out out_dir` with the default job; the new version's folder."""
    subprocess.run([sys.executable, "-m", "worker.cli", "train", "--out", str(out_dir)], check=True)
    manifests = sorted(out_dir.glob("*/*/manifest.json"))
    if not manifests:
        raise SystemExit(f"training left no model under {out_dir}")
    return manifests[-1].parent


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:5.1f}%" if whole else "   - "


def report(answers: list[Answer], uncertain_below: float) -> None:
    parts: dict[str, list[Answer]] = defaultdict(list)
    for a in answers:
        parts[a.item.part].append(a)
    print(f"\n{'part':<8}{'images':>8}{'accuracy':>10}{'refused':>9}{'3 or 8':>8}{'truly 3/8':>10}{'ms/read':>9}")
    for part, group in parts.items():
        right = sum(a.right for a in group)
        refused = sum(a.digit < 0 for a in group)
        three_eight = sum(a.digit in (3, 8) for a in group)
        truly = sum(a.item.label in (3, 8) for a in group)
        ms = sum(a.ms for a in group) / len(group)
        print(f"{part:<8}{len(group):>8}{_pct(right, len(group)):>10}{refused:>9}{_pct(three_eight, len(group)):>8}"
              f"{_pct(truly, len(group)):>10}{ms:>9.1f}")

    print(f"\n{'condition':<16}{'images':>7}{'accuracy':>10}   commonest confusions (true->read)")
    by_condition: dict[str, list[Answer]] = defaultdict(list)
    for a in answers:
        by_condition[a.item.condition].append(a)
    for condition, group in by_condition.items():
        confusions = Counter(f"{a.item.label}->{a.digit if a.digit >= 0 else a.code}" for a in group if not a.right)
        common = ", ".join(f"{pair} x{n}" for pair, n in confusions.most_common(3))
        print(f"{condition:<16}{len(group):>7}{_pct(sum(a.right for a in group), len(group)):>10}   {common}")

    for part, group in parts.items():
        pairs = Counter(f"{a.item.label}->{a.digit}" for a in group if not a.right and a.digit >= 0)
        print(f"\nconfusions, {part}: " + (", ".join(f"{p} x{n}" for p, n in pairs.most_common(10)) or "none"))

    answered = [a for a in answers if a.item.part != "plain" and a.digit >= 0]
    misses = [a for a in answered if not a.right]
    hits = [a for a in answered if a.right]
    if misses and hits:
        mean_wrong = sum(a.confidence for a in misses) / len(misses)
        mean_right = sum(a.confidence for a in hits) / len(hits)
        print(f"\nuncertain on photo + small ({len(hits)} right, {len(misses)} wrong; served threshold "
              f"{uncertain_below}): wrong flagged {_pct(sum(a.uncertain for a in misses), len(misses))}, right flagged "
              f"{_pct(sum(a.uncertain for a in hits), len(hits))}; mean confidence wrong "
              f"{mean_wrong:.3f}, right {mean_right:.3f}")
        print("  at other thresholds: " + "; ".join(
            f"{t}: wrong {_pct(sum(a.confidence < t for a in misses), len(misses)).strip()} / right "
            f"{_pct(sum(a.confidence < t for a in hits), len(hits)).strip()}" for t in THRESHOLDS))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="a model's folder (model.pt + manifest.json)")
    source.add_argument("--train", action="store_true", help="train the default job first (digits train)")
    parser.add_argument("--set-dir", type=Path, default=Path("data/photo-set"))
    parser.add_argument("--tta", action="store_true", help="serve with API__TTA=true")
    parser.add_argument("--direct", action="store_true", help="in-process, without HTTP or the preprocess hash check")
    parser.add_argument("--limit", type=int, default=None, help="read only the first N images of each part")
    parser.add_argument("--json", type=Path, default=None, help="also write every answer here")
    args = parser.parse_args()

    if not (args.set_dir / "labels.csv").is_file():
        print(f"rendering the photo set into {args.set_dir} ...")
        build(args.set_dir)
    items = load(args.set_dir)
    if args.limit is not None:
        seen: Counter[str] = Counter()
        kept = []
        for item in items:
            seen[item.part] += 1
            if seen[item.part] <= args.limit:
                kept.append(item)
        items = kept

    from config.settings import ApiSettings

    threshold = float(os.environ.get("API__UNCERTAIN_BELOW", ApiSettings().uncertain_below))
    with tempfile.TemporaryDirectory(prefix="bench-quality-train-") as tmp:
        model_dir = train_default_job(Path(tmp)) if args.train else args.model
        manifest = json.loads((model_dir / "manifest.json").read_text())
        print(f"model {manifest['model_id']} {manifest['version']} (test_acc {manifest.get('test_acc')}, temperature "
              f"{manifest.get('temperature')}); {len(items)} images from {args.set_dir}"
              f"{'; TTA' if args.tta else ''}{'; in-process' if args.direct else '; over HTTP'}")
        if args.direct:
            answers = read_in_process(model_dir, args.set_dir, items, tta=args.tta, uncertain_below=threshold)
        else:
            with served(model_dir, tta=args.tta) as url:
                answers = read_over_http(url, args.set_dir, items)
    report(answers, threshold)
    if args.json is not None:
        args.json.write_text(json.dumps([{**asdict(a.item), "digit": a.digit, "confidence": a.confidence,
                                          "uncertain": a.uncertain, "code": a.code, "ms": a.ms} for a in answers]))


if __name__ == "__main__":
    main()
