"""Benchmarks (not tests). `app` first, so its OpenMP settings hold here too (see app/__init__.py)."""

import app  # noqa: F401
