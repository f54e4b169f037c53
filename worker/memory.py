"""Memory figures for the batch events, measured from /proc and the process's memory cgroup (v2 or v1).

Every figure is in whole MiB. One that cannot be read is 0, and only then: off Linux (no /proc), or a
cgroup without a memory controller the process can see. A cgroup with no limit reports the machine's
total memory as its limit, which is the ceiling the process really has.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

MIB: Final = 1024 * 1024
CGROUP_ROOT: Final = Path("/sys/fs/cgroup")
PROC: Final = Path("/proc")
# cgroup v1 writes "no limit" as a number near 2**63, rounded down to the page size.
V1_NO_LIMIT: Final = 2**62


@dataclass(frozen=True)
class CgroupMemory:
    usage_mb: int
    limit_mb: int
    anon_mb: int
    file_mb: int

    @property
    def pct(self) -> float:
        return round(100.0 * self.usage_mb / self.limit_mb, 2) if self.limit_mb > 0 else 0.0


@dataclass(frozen=True)
class MemorySnapshot:
    main_rss_mb: int
    workers_rss_mb: int
    worker_count: int
    cgroup: CgroupMemory


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _int(text: str | None) -> int | None:
    try:
        return int(text.strip()) if text is not None else None
    except ValueError:
        return None


def _stat(text: str | None) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in (text or "").splitlines():
        key, _, value = line.partition(" ")
        number = _int(value)
        if number is not None:
            out[key] = number
    return out


def rss_bytes(pid: int | str = "self", proc: Path = PROC) -> int:
    """Resident set size of one process (from /proc/<pid>/statm); 0 where it cannot be read."""
    fields = (_read(proc / str(pid) / "statm") or "").split()
    return int(fields[1]) * os.sysconf("SC_PAGE_SIZE") if len(fields) > 1 and fields[1].isdigit() else 0


def child_pids(proc: Path = PROC) -> list[int]:
    """This process's direct children (e.g. data-loader workers), from each thread's `children` list."""
    pids: set[int] = set()
    try:
        tasks = list((proc / "self" / "task").iterdir())
    except OSError:
        return []
    for task in tasks:
        pids.update(int(p) for p in (_read(task / "children") or "").split() if p.isdigit())
    return sorted(pids)


def total_memory_bytes(proc: Path = PROC) -> int:
    for line in (_read(proc / "meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            return int(parts[1]) * 1024 if len(parts) > 1 and parts[1].isdigit() else 0
    return 0


def _own_cgroup_dir(base: Path, proc_cgroup: str, controller: str | None) -> Path | None:
    """The deepest directory of this process's cgroup path under `base` that exists (namespaces hide parents)."""
    for line in proc_cgroup.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if (controller is None and hierarchy == "0" and controllers == "") or (
            controller is not None and controller in controllers.split(",")
        ):
            directory = base / path.strip().lstrip("/")
            while directory != base and not directory.is_dir():
                directory = directory.parent
            return directory
    return base if base.is_dir() else None


def read_cgroup(root: Path = CGROUP_ROOT, proc: Path = PROC) -> CgroupMemory:
    """Usage, limit and the anon/file split of this process's memory cgroup, v2 (unified) or v1."""
    proc_cgroup = _read(proc / "self" / "cgroup") or ""
    machine = total_memory_bytes(proc)
    if (root / "cgroup.controllers").is_file():  # v2 mounted at the root
        directory = _own_cgroup_dir(root, proc_cgroup, None)
        # The root cgroup itself has no memory.current; walk up to the nearest one that does.
        while directory is not None and not (directory / "memory.current").is_file() and directory != root:
            directory = directory.parent
        if directory is None or not (directory / "memory.current").is_file():
            return CgroupMemory(0, machine // MIB, 0, 0)
        usage = _int(_read(directory / "memory.current")) or 0
        raw_limit = (_read(directory / "memory.max") or "max").strip()
        limit = _int(raw_limit) if raw_limit != "max" else None
        stat = _stat(_read(directory / "memory.stat"))
        anon, file = stat.get("anon", 0), stat.get("file", 0)
    else:
        base = root / "memory"
        directory = _own_cgroup_dir(base, proc_cgroup, "memory")
        while directory is not None and not (directory / "memory.usage_in_bytes").is_file() and directory != base:
            directory = directory.parent
        if directory is None or not (directory / "memory.usage_in_bytes").is_file():
            return CgroupMemory(0, machine // MIB, 0, 0)
        usage = _int(_read(directory / "memory.usage_in_bytes")) or 0
        limit = _int(_read(directory / "memory.limit_in_bytes"))
        limit = None if limit is None or limit >= V1_NO_LIMIT else limit
        stat = _stat(_read(directory / "memory.stat"))
        anon = stat.get("total_rss", stat.get("rss", 0))
        file = stat.get("total_cache", stat.get("cache", 0))
    ceiling = min(limit, machine) if limit is not None and machine else (limit or machine)
    return CgroupMemory(usage // MIB, ceiling // MIB, anon // MIB, file // MIB)


def snapshot(root: Path = CGROUP_ROOT, proc: Path = PROC) -> MemorySnapshot:
    children = child_pids(proc)
    return MemorySnapshot(
        main_rss_mb=rss_bytes("self", proc) // MIB,
        workers_rss_mb=sum(rss_bytes(pid, proc) for pid in children) // MIB,
        worker_count=len(children),
        cgroup=read_cgroup(root, proc),
    )
