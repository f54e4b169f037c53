"""`make mutation`: remove each critical guard in turn, in a scratch copy, and check that its tests notice.

Not part of `make test`: it runs the targeted tests once per mutant (minutes on 2 cores). Each mutant
is exact-snippet replacements in one file; a snippet that is not found exactly once stops the run, so a
refactor that moves a guard is noticed and its row below retargeted. A mutant is killed when every test
listed for it fails (each one is a guard of it), partly killed when only some do, and survives when none
does. The listed tests first run on an unmutated copy, where all must pass.

    python -m bench.mutation [--only NAME ...] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Final


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # the file, relative to the repository root
    edits: tuple[tuple[str, str], ...]  # (exact snippet, replacement), each snippet found exactly once
    tests: tuple[str, ...]  # pytest node ids; every one must fail with the guard removed


AUTH: Final = "tests/test_admin_upload.py"
CRASH: Final = "tests/test_crash_safety.py"
DISCORD: Final = "tests/test_discord_interactions.py"
READ_INVERT: Final = "tests/test_read_api.py::test_invert_auto_finds_the_ink_on_dark_or_light_paper"
UPLOAD_CRASH: Final = f"{CRASH}::test_an_interrupted_upload_leaves_the_served_version_whole_and_can_be_retried"

# The guards, one row each: what removing it looks like, and the tests that must notice.
MUTANTS: Final[tuple[Mutant, ...]] = (
    # --- the six the hand-made check of issue 16 found unguarded ---
    Mutant(
        "empty X-Api-Key accepted while a key is set", "app/auth.py",
        (("        and secrets.compare_digest(x_api_key.encode(",
          '        and (x_api_key == "" or secrets.compare_digest(x_api_key.encode('),
         ('.get_secret_value().encode("utf-8"))\n    )\n', '.get_secret_value().encode("utf-8")))\n    )\n')),
        (f"{AUTH}::test_a_refused_upload_changes_nothing[empty key]",
         f"{AUTH}::test_an_empty_key_is_refused_on_every_admin_route_while_a_key_is_configured"),
    ),
    Mutant(
        "model version written in place (visible before its manifest is)", "app/store.py",
        (("                write_atomic(incoming / MANIFEST_FILE, "
          'stored_manifest.model_dump_json(indent=2).encode("utf-8"))\n'
          "                write_atomic(incoming / RECORD_FILE, record.model_dump_json(indent=2).encode(\"utf-8\"))\n"
          "                model_dir.mkdir(exist_ok=True)\n"
          "                os.rename(incoming, target)\n",
          """                write_atomic(incoming / RECORD_FILE, record.model_dump_json(indent=2).encode("utf-8"))
                model_dir.mkdir(exist_ok=True)
                os.rename(incoming, target)
                manifest_path = target / MANIFEST_FILE
                with manifest_path.open("wb") as f:
                    f.write(stored_manifest.model_dump_json(indent=2).encode("utf-8"))
                    f.flush()
                    os.fsync(f.fileno())
"""),),
        (UPLOAD_CRASH,),
    ),
    Mutant(
        "active.json written in place", "app/store.py",
        (("write_atomic(self.root / ACTIVE_FILE, body)", "(self.root / ACTIVE_FILE).write_bytes(body)"),),
        (UPLOAD_CRASH, f"{CRASH}::test_a_rollback_interrupted_at_any_step_leaves_a_readable_pointer"),
    ),
    Mutant(
        "worker artifacts written in place", "worker/artifacts.py",
        (("    write_atomic(weights_path, weights)", "    weights_path.write_bytes(weights)"),
         ('    write_atomic(manifest_path, json.dumps(manifest, indent=2).encode("utf-8"))',
          '    manifest_path.write_bytes(json.dumps(manifest, indent=2).encode("utf-8"))')),
        (f"{CRASH}::test_artifacts_interrupted_at_any_step_are_whole_or_absent_and_earlier_runs_untouched",),
    ),
    Mutant(
        "user error (invalid payload) retried like a system error", "worker/job.py",
        (("    if not failure.retryable:\n        rq_job.retries_left = 0",
          "    if not failure.retryable:\n        pass"),),
        ("tests/test_worker_e2e.py::test_invalid_payload_fails_at_once_as_a_user_error_without_retry",),
    ),
    Mutant(
        "augment=true ignored by training", "worker/train.py",
        (("    if augment:\n        x = random_affine(x, gen)",
          "    if False:\n        x = random_affine(x, gen)"),),
        ("tests/test_worker_train.py::test_augment_changes_what_the_network_sees_and_off_it_sees_the_images_as_they_are",),
    ),
    # --- the three issue 16 found guarded by a single test ---
    Mutant(
        "interaction id not deduplicated", "app/discord/state.py",
        (("redis.call('SET', KEYS[1], 'pending', 'NX', 'EX', ARGV[1])",
          "redis.call('SET', KEYS[1], 'pending', 'EX', ARGV[1])"),),
        (f"{DISCORD}::test_the_same_interaction_delivered_twice_enqueues_once",
         f"{DISCORD}::test_the_same_interaction_delivered_at_once_by_several_retries_enqueues_once"),
    ),
    Mutant(
        "no per-user /train rate limit", "app/discord/state.py",
        (("if redis.call('ZCARD', key) >= limit then", "if false then"),),
        (f"{DISCORD}::test_train_is_rate_limited_per_user_with_the_wait_in_the_reply",
         f"{DISCORD}::test_train_limit_is_shared_by_every_api_replica"),
    ),
    Mutant(
        "invert=auto read as dark ink on light paper by /v1/read", "app/routes/read.py",
        (("    return None if isinstance(value, str) and value.strip().lower() in _AUTO else value",
          "    return True if isinstance(value, str) and value.strip().lower() in _AUTO else value"),),
        (READ_INVERT,),
    ),
    Mutant(
        "polarity auto-detection broken (always dark ink)", "app/preprocess.py",
        (("dark_ink = _dark_ink(gray, ring) if invert is None else invert",
          "dark_ink = True if invert is None else invert"),),
        ("tests/test_preprocess.py::test_same_digit_same_28x28[light_on_dark-img3]", READ_INVERT),
    ),
    # --- a few of the guards the hand-made check found already caught ---
    Mutant(
        "admin endpoints open when no key is configured", "app/auth.py",
        (('    if settings.handwriting_api_key is None:\n'
          '        raise ApiError(401, "unauthorized", "admin endpoints are disabled: HANDWRITING_API_KEY is not set")',
          "    if settings.handwriting_api_key is None:\n        return"),),
        (f"{AUTH}::test_with_no_key_configured_admin_endpoints_refuse_everything",),
    ),
    Mutant(
        "weights unpickled without weights_only", "app/loading.py",
        (('torch.load(path, map_location="cpu", weights_only=True)',
          'torch.load(path, map_location="cpu", weights_only=False)'),),
        (f"{AUTH}::test_a_pickle_that_runs_code_is_refused_without_running_it[torch.save zip]",
         f"{AUTH}::test_a_pickle_that_runs_code_is_refused_without_running_it[plain pickle]"),
    ),
    Mutant(
        "preprocess_hash not checked on upload", "app/routes/admin.py",
        (("    if manifest.preprocess_hash != PREPROCESS_HASH:", "    if False:"),),
        (f"{AUTH}::test_a_refused_upload_changes_nothing[other preprocessing]",),
    ),
    Mutant(
        "manifest model_id not checked against the form's", "app/routes/admin.py",
        (("    if manifest.model_id != model_id:", "    if False:"),),
        (f"{AUTH}::test_a_refused_upload_changes_nothing[model_id differs]",),
    ),
)

ROOT: Final = Path(__file__).resolve().parent.parent
PER_RUN_TIMEOUT_S: Final = 1200
SKIP: Final = (".venv", "data", ".git")


class TableError(Exception):
    """A row of MUTANTS no longer matches the code: retarget it."""


@dataclass(frozen=True)
class Outcome:
    passed: tuple[str, ...]
    failed: tuple[str, ...]
    seconds: float
    log: Path


def tracked_files() -> list[str]:
    """What the working tree holds (edits not yet committed included), without ignored files."""
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True).stdout.decode().split("\0")
    return [f for f in listed if f and f.split("/")[0] not in SKIP and (ROOT / f).is_file()]


def make_copy(dest: Path, files: list[str]) -> Path:
    for name in files:
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return dest


def apply(mutant: Mutant, tree: Path) -> None:
    path = tree / mutant.path
    text = path.read_text()
    for old, new in mutant.edits:
        found = text.count(old)
        if found != 1:
            raise TableError(f"{mutant.name}: snippet found {found} times in {mutant.path} (expected once):\n{old}")
        text = text.replace(old, new)
    try:  # a mutant that does not even compile would be "killed" by every test, proving nothing
        compile(text, str(path), "exec")
    except SyntaxError as exc:
        raise TableError(f"{mutant.name}: the mutated {mutant.path} does not compile: {exc}") from exc
    path.write_text(text)


def child_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = str(tree)  # ahead of the editable install's finder, which points at the real tree
    return env


def check_imports_come_from(tree: Path) -> None:
    probe = "import app.store, worker.job, config.settings, tests.support as t; print(app.store.__file__, t.ROOT)"
    out = subprocess.run([sys.executable, "-c", probe], cwd=tree, env=child_env(tree), check=True,
                         capture_output=True, text=True, timeout=120).stdout.split()
    if not all(Path(p).resolve().is_relative_to(tree.resolve()) for p in out):
        raise TableError(f"the scratch copy at {tree} is not what runs: imports came from {out}")


def run_tests(tree: Path, tests: tuple[str, ...], label: str) -> Outcome:
    report = tree / f"junit-{label}.xml"
    log = tree / f"pytest-{label}.log"
    started = time.monotonic()
    with log.open("wb") as out:
        try:
            subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}",
                            *tests], cwd=tree, env=child_env(tree), stdout=out, stderr=subprocess.STDOUT,
                           timeout=PER_RUN_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired:
            return Outcome((), ("(timed out)",), time.monotonic() - started, log)
    seconds = time.monotonic() - started
    if not report.exists():
        raise TableError(f"{label}: pytest wrote no report; see {log}")
    passed: list[str] = []
    failed: list[str] = []
    for case in ET.parse(report).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        if case.find("skipped") is not None:
            raise TableError(f"{label}: {name} was skipped; a skipped test guards nothing")
        (failed if case.find("failure") is not None or case.find("error") is not None else passed).append(name)
    if len(passed) + len(failed) != len(tests):
        raise TableError(f"{label}: {len(tests)} tests listed, {len(passed) + len(failed)} ran; see {log}")
    return Outcome(tuple(passed), tuple(failed), seconds, log)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", default=None, help="run only mutants whose name contains one of these")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copies")
    args = parser.parse_args()
    mutants = [m for m in MUTANTS if args.only is None or any(o in m.name for o in args.only)]
    if not mutants:
        print("no mutant matches", args.only)
        return 2
    files = tracked_files()
    scratch = Path(tempfile.mkdtemp(prefix="mutation-"))
    started = time.monotonic()
    try:
        for mutant in mutants:  # every row still matches the code, before anything slow runs
            apply(mutant, make_copy(scratch / "check", [mutant.path]))
        baseline_tree = make_copy(scratch / "baseline", files)
        check_imports_come_from(baseline_tree)
        all_tests = tuple(dict.fromkeys(t for m in mutants for t in m.tests))
        baseline = run_tests(baseline_tree, all_tests, "baseline")
        print(f"baseline: {len(baseline.passed)} of {len(all_tests)} targeted tests pass unmutated "
              f"({baseline.seconds:.0f} s)", flush=True)
        if baseline.failed:
            print("these fail without any mutation, so they prove nothing here:", *baseline.failed, sep="\n  ")
            print(f"log: {baseline.log}")
            return 1

        rows: list[tuple[str, str, str, float]] = []
        for i, mutant in enumerate(mutants, 1):
            tree = make_copy(scratch / f"m{i:02d}", files)
            apply(mutant, tree)
            check_imports_come_from(tree)
            outcome = run_tests(tree, mutant.tests, f"m{i:02d}")
            verdict = "killed" if not outcome.passed else "PARTLY" if outcome.failed else "SURVIVED"
            rows.append((mutant.name, mutant.path, f"{verdict} ({len(outcome.failed)}/{len(mutant.tests)} tests fail)",
                         outcome.seconds))
            print(f"[{i:2d}/{len(mutants)}] {verdict:8s} {mutant.name} ({outcome.seconds:.0f} s)", flush=True)
            for name in outcome.passed:
                print(f"           still passes: {name}  (log: {outcome.log})")
            if not args.keep:
                shutil.rmtree(tree, ignore_errors=True)
    except TableError as exc:
        print(f"mutation table out of date: {exc}", file=sys.stderr)
        return 2
    finally:
        if not args.keep:
            shutil.rmtree(scratch, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print(f"\n{'guard removed':{width}}  {'file':24}  {'result':32}  seconds")
    for name, path, result, seconds in rows:
        print(f"{name:{width}}  {path:24}  {result:32}  {seconds:7.0f}")
    killed = sum(r[2].startswith("killed") for r in rows)
    print(f"\n{killed} of {len(rows)} mutants killed, {len(rows) - killed} not; "
          f"{time.monotonic() - started:.0f} s in all, on {os.cpu_count()} CPUs")
    return 0 if killed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
