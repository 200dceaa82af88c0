"""Requests waiting for a row of the running batch, by priority class, then by tenant in turn.

Under overload the classes decide who waits and who is refused: a request is admitted while fewer
than `capacity` wait; when the room is full, an arrival pushes out the newest waiting request of
the lowest class below its own (that one is refused, "server busy"), else it is refused itself. So
critical requests keep their place and batch requests are refused first. Rows go to the highest
class first; within a class tenants take turns (one request each, first come first served per
tenant), so one tenant's burst does not starve another's requests of the same class.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict, deque
from typing import Any

CLASSES = ("critical", "standard", "batch")  # rank 0, 1, 2
DEFAULT_RANK = 1  # a request that names no class (Triton's own clients, a server without keys)


def class_rank(rank: int) -> int:
    """A request's class rank as given, held to the classes there are."""
    return min(max(int(rank), 0), len(CLASSES) - 1)


class WaitingRoom:
    def __init__(self):
        self._ready = threading.Condition()
        self._classes: list[OrderedDict[str, deque]] = [OrderedDict() for _ in CLASSES]  # tenant -> requests, in turn
        self._count = 0
        self._closed = False

    def __len__(self) -> int:
        return self._count

    def offer(self, item: Any, rank: int = DEFAULT_RANK, tenant: str = "", capacity: int | None = None) -> tuple[bool, Any]:
        """(admitted, pushed_out): `pushed_out` is a waiting item that lost its place to this one
        (the caller refuses it), else None."""
        rank = class_rank(rank)
        with self._ready:
            pushed_out = None
            if capacity is not None and self._count >= capacity:
                lower = next((r for r in range(len(self._classes) - 1, rank, -1) if self._classes[r]), None)
                if lower is None:
                    return False, None
                # the tenant with the most waiting in that class gives up its newest
                tenants = self._classes[lower]
                victim = max(tenants, key=lambda t: len(tenants[t]))
                pushed_out = tenants[victim].pop()
                if not tenants[victim]:
                    del tenants[victim]
                self._count -= 1
            self._classes[rank].setdefault(tenant, deque()).append(item)
            self._count += 1
            self._ready.notify()
            return True, pushed_out

    def get(self, block: bool = True) -> Any:
        """The next request (highest class, tenants in turn); None once closed; queue.Empty when
        not blocking and nothing waits."""
        with self._ready:
            while not self._count and not self._closed:
                if not block:
                    raise queue.Empty
                self._ready.wait()
            if self._closed:
                return None
            return self._take()

    def _take(self) -> Any:
        for tenants in self._classes:
            if tenants:
                tenant, waiting = next(iter(tenants.items()))
                item = waiting.popleft()
                del tenants[tenant]
                if waiting:  # its next request goes to the back of the turn
                    tenants[tenant] = waiting
                self._count -= 1
                return item
        raise queue.Empty

    def close(self) -> None:
        """`get` returns None from now on (the worker stops); `drain` hands out what still waits."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()

    def drain(self) -> list[Any]:
        with self._ready:
            items = []
            while self._count:
                items.append(self._take())
            return items
