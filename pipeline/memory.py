"""Peak memory of this process and of its children, and what a folder takes on disk: the numbers the
runner records for every stage (run summary, manifest, MLflow)."""

from __future__ import annotations

import gc
import resource
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process. On Linux, VmHWM: ru_maxrss is carried across
    fork+exec, so it would report the parent's size at fork time instead of this model's."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def release_free_memory() -> None:
    """Hand memory the process has freed back to the system (glibc `malloc_trim`): freed heap
    otherwise stays resident, and the next stage's peak would start from the last one's garbage."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


def reset_peak_rss() -> bool:
    """Start a new high-water mark for this process (Linux: `5` to /proc/self/clear_refs), so the
    next `peak_rss_mb` is one stage's own peak. False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def disk_usage_mb(folder: Path) -> dict[str, float]:
    """`written`: bytes of files only this folder holds; `linked`: files hard-linked from elsewhere
    (written once, by another stage)."""
    written = linked = 0
    for p in folder.rglob("*"):
        if p.is_file() and not p.is_symlink():
            st = p.stat()
            if st.st_nlink > 1:
                linked += st.st_size
            else:
                written += st.st_size
    return {"written": written / 1e6, "linked": linked / 1e6}


class StagePeak:
    """Measures one stage's peak RSS: this process's, from a fresh high-water mark. A stage that runs
    child processes reports their peaks itself (`CHILD_PEAK_KEY` in its artifact's meta, each child
    reading its own VmHWM): the kernel's per-child maximum (`RUSAGE_CHILDREN`) counts a child's size
    before exec, i.e. this process's size at fork, so any small subprocess would read as gigabytes."""

    def __enter__(self) -> "StagePeak":
        gc.collect()
        release_free_memory()
        self.resettable = reset_peak_rss()
        self.result: dict[str, float | None] = {}
        return self

    def __exit__(self, *exc) -> None:
        self.result = {"peak_rss_mb": round(peak_rss_mb(), 1) if self.resettable else None}


# meta key of a stage whose child processes measured their own peak RSS (validate's latency runs)
CHILD_PEAK_KEY = "children_peak_rss_mb"
