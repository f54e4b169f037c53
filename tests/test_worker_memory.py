"""The memory figures of the batch events: real ones from this process, and both cgroup layouts from fixtures.

The fixtures are directories shaped like /sys/fs/cgroup (v2 unified, v1 per controller) and /proc.
"""

from __future__ import annotations

import os
from pathlib import Path

from worker.memory import MIB, read_cgroup, snapshot

MEMTOTAL_KB = 16 * 1024 * 1024  # a 16 GiB machine
PAGE = os.sysconf("SC_PAGE_SIZE")


def fake_proc(tmp_path: Path, cgroup: str, rss_pages: int = 0, children: dict[int, int] | None = None) -> Path:
    proc = tmp_path / "proc"
    (proc / "self" / "task" / "1").mkdir(parents=True)
    (proc / "self" / "cgroup").write_text(cgroup)
    (proc / "self" / "statm").write_text(f"999999 {rss_pages} 10 1 0 50 0\n")
    (proc / "self" / "task" / "1" / "children").write_text(" ".join(str(p) for p in children or {}))
    for pid, pages in (children or {}).items():
        (proc / str(pid)).mkdir()
        (proc / str(pid) / "statm").write_text(f"1 {pages} 0 0 0 0 0\n")
    (proc / "meminfo").write_text(f"MemTotal:       {MEMTOTAL_KB} kB\nMemFree:        1024 kB\n")
    return proc


def write(directory: Path, files: dict[str, str]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (directory / name).write_text(text)


def test_this_process_has_a_real_resident_size_and_a_memory_ceiling() -> None:
    memory = snapshot()
    assert memory.main_rss_mb > 0  # read from /proc/self/statm of the test process
    assert memory.cgroup.limit_mb > 0  # the cgroup's limit, or the machine's memory where it sets none


def test_cgroup_v2_reads_usage_limit_and_the_anon_file_split(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root, {"cgroup.controllers": "cpu memory pids\n"})
    write(root / "system.slice" / "worker.service", {
        "memory.current": str(1536 * MIB), "memory.max": str(4096 * MIB),
        "memory.stat": f"anon {1024 * MIB}\nfile {256 * MIB}\nkernel 1234\n",
    })
    proc = fake_proc(tmp_path, "0::/system.slice/worker.service\n")
    memory = read_cgroup(root, proc)
    assert (memory.usage_mb, memory.limit_mb, memory.anon_mb, memory.file_mb) == (1536, 4096, 1024, 256)
    assert memory.pct == 37.5


def test_cgroup_v2_without_a_limit_reports_the_machines_memory(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root, {"cgroup.controllers": "memory\n", "memory.current": str(100 * MIB), "memory.max": "max\n",
                 "memory.stat": f"anon {60 * MIB}\nfile {30 * MIB}\n"})
    proc = fake_proc(tmp_path, "0::/\n")  # a container's own namespace: its cgroup is the root
    memory = read_cgroup(root, proc)
    assert (memory.usage_mb, memory.limit_mb, memory.anon_mb, memory.file_mb) == (100, 16 * 1024, 60, 30)


def test_cgroup_v1_reads_the_memory_controller_hierarchically(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    write(root / "memory" / "docker" / "abc", {
        "memory.usage_in_bytes": str(700 * MIB), "memory.limit_in_bytes": str(2048 * MIB),
        "memory.stat": f"cache {1 * MIB}\nrss {2 * MIB}\ntotal_cache {200 * MIB}\ntotal_rss {500 * MIB}\n",
    })
    proc = fake_proc(tmp_path, "5:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n")
    memory = read_cgroup(root, proc)
    assert (memory.usage_mb, memory.limit_mb, memory.anon_mb, memory.file_mb) == (700, 2048, 500, 200)


def test_cgroup_v1_unlimited_and_hidden_path_falls_back_to_the_visible_controller(tmp_path: Path) -> None:
    root = tmp_path / "cgroup"
    # The path /proc names is not mounted inside this namespace; the controller's root is what it sees.
    write(root / "memory", {"memory.usage_in_bytes": str(300 * MIB), "memory.limit_in_bytes": "9223372036854771712",
                            "memory.stat": f"rss {120 * MIB}\ncache {80 * MIB}\n"})
    proc = fake_proc(tmp_path, "4:memory:/process_api/0123abcd\n")
    memory = read_cgroup(root, proc)
    assert (memory.usage_mb, memory.limit_mb, memory.anon_mb, memory.file_mb) == (300, 16 * 1024, 120, 80)


def test_no_memory_cgroup_gives_zeros_but_the_machines_memory(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path, "0::/\n")
    memory = read_cgroup(tmp_path / "no-cgroup-here", proc)
    assert (memory.usage_mb, memory.limit_mb, memory.anon_mb, memory.file_mb, memory.pct) == (0, 16 * 1024, 0, 0, 0.0)
    nothing = snapshot(tmp_path / "none", tmp_path / "no-proc")  # off Linux: nothing can be read, all zero
    assert (nothing.main_rss_mb, nothing.worker_count, nothing.cgroup.limit_mb, nothing.cgroup.usage_mb) == (0, 0, 0, 0)


def test_process_and_worker_rss_come_from_proc(tmp_path: Path) -> None:
    mib_pages = MIB // PAGE
    proc = fake_proc(tmp_path, "0::/\n", rss_pages=300 * mib_pages, children={41: 20 * mib_pages, 42: 30 * mib_pages})
    memory = snapshot(tmp_path / "cgroup", proc)
    assert (memory.main_rss_mb, memory.workers_rss_mb, memory.worker_count) == (300, 50, 2)
