"""A tamper-evident request log: one JSON line per OpenAI request, each chained to the one before
(pipeline/chain.py) and written in canonical form. Editing any byte of a record breaks its hash or
its form; removing or reordering records breaks the next record's `prev` and `seq`.
`kiln audit verify FILE` names the first record that does not hold. What a chain cannot show by
itself is records cut from the end: the server prints the head (`seq` and `hash`) when it stops,
and `/metrics` exports the record count, so the head can be kept elsewhere and compared
(`kiln audit verify FILE --head HASH`).

Records: time (UTC), tenant and key id (never the key), the model name requested, the alias and
version that answered, HTTP status, finish reason, prompt and completion tokens, the W3C trace id
when the request carried one, and the prompt only when the operator opts in. One writer per file:
each replica of `kiln serve` logs to its own.
"""

from __future__ import annotations

import os
import threading
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.chain import GENESIS, Verified, canonical, chained, check_head, verify_lines
from pipeline.errors import IntegrityError


def verify_file(path: Path, head: str | None = None) -> Verified:
    try:
        with path.open("rb") as f:
            data = f.read()
    except OSError as e:
        raise IntegrityError(f"{path}: cannot read it ({e.strerror or e})") from None
    text = data.decode("utf-8", errors="replace")
    if text and not text.endswith("\n"):
        raise IntegrityError(f"{path}: line {text.count(chr(10)) + 1}: the last record is cut short (no newline)")
    done = verify_lines(text.splitlines(), str(path))
    check_head(done, head, str(path))
    return done


class RequestLog:
    """Appends chained records; continues an existing file after verifying it (a broken chain is
    refused, so a server never extends a log that was tampered with)."""

    def __init__(self, path: Path, with_prompts: bool = False):
        self.path, self.with_prompts = path, with_prompts
        path.parent.mkdir(parents=True, exist_ok=True)
        state = verify_file(path) if path.exists() else Verified(0, GENESIS)
        self.seq, self.prev = state.records, state.head
        self._lock = threading.Lock()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def append(self, **fields: Any) -> dict[str, Any]:
        if not self.with_prompts:
            fields.pop("prompt", None)
        with self._lock:
            record = chained({"time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **fields}, self.seq + 1, self.prev)
            line = (canonical(record) + "\n").encode()
            os.write(self._fd, line)  # one write of the whole line, O_APPEND
            self.seq, self.prev = record["seq"], record["hash"]
        return record

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
