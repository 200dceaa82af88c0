"""Child processes that never outlive the Kiln process that started them."""

from __future__ import annotations

import ctypes
import signal
import sys

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """`preexec_fn` for a child: the kernel sends it SIGKILL when its parent dies, even by SIGKILL
    (Linux `prctl(PR_SET_PDEATHSIG)`; elsewhere nothing is set)."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
