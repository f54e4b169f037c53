"""What every benchmark prints beside its figures: the CPU's model and vector units, torch, cores."""

from __future__ import annotations

import platform
from functools import lru_cache
from pathlib import Path

UNITS = ("avx2", "avx512f", "avx512_bf16", "amx")


@lru_cache(maxsize=1)
def cpu_model_and_units() -> tuple[str, frozenset[str]]:
    """The model name and which of UNITS the CPU has (amx: any of the amx_* flags), from /proc/cpuinfo."""
    model, flags = platform.processor() or "unknown CPU", set[str]()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:
        pass
    if any(flag.startswith("amx") for flag in flags):
        flags.add("amx")
    return model, frozenset(flags & set(UNITS))


def cpu_line() -> str:
    """e.g. "CPU: AMD EPYC, 2 cores; avx2 yes, avx512f no, avx512_bf16 no, amx no; native bf16 no; torch 2.14.1"."""
    import torch

    from app.network import available_cores, cpu_has_fast_bf16

    model, units = cpu_model_and_units()
    listed = ", ".join(f"{unit} {'yes' if unit in units else 'no'}" for unit in UNITS)
    return (f"CPU: {model}, {available_cores()} cores; {listed}; "
            f"native bf16 {'yes' if cpu_has_fast_bf16() else 'no'}; torch {torch.__version__}")


def cpu_tag() -> str:
    """The short form beside each figure, e.g. "[AMD EPYC | avx2]" or "[AMD EPYC | avx2 avx512f avx512_bf16]"."""
    model, units = cpu_model_and_units()
    return f"[{model} | {' '.join(unit for unit in UNITS if unit in units) or 'no avx2'}]"
