"""Peak memory of this process and of its children, and what a folder takes on disk: the numbers the
runner records for every stage (run summary, manifest, MLflow)."""

from __future__ import annotations

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


def reset_peak_rss() -> bool:
    """Start a new high-water mark for this process (Linux: `5` to /proc/self/clear_refs), so the
    next `peak_rss_mb` is one stage's own peak. False where the kernel does not allow it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def children_peak_rss_mb() -> float:
    """The largest peak RSS of any child process waited for so far (it cannot be reset)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


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
    """Measures one stage's peak RSS: this process's from a fresh high-water mark, and its children's
    when one of them set a new maximum during the stage (e.g. validate's latency subprocesses)."""

    def __enter__(self) -> "StagePeak":
        self.resettable = reset_peak_rss()
        self.children_before = children_peak_rss_mb()
        self.result: dict[str, float | None] = {}
        return self

    def __exit__(self, *exc) -> None:
        children = children_peak_rss_mb()
        self.result = {"peak_rss_mb": round(peak_rss_mb(), 1) if self.resettable else None,
                       "children_peak_rss_mb": round(children, 1) if children > self.children_before else None}
