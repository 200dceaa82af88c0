"""A tamper-evident request log: one JSON line per OpenAI request, each chained to the one before.

Every record carries `seq` (1, 2, …), `prev` (the previous record's `hash`; 64 zeros for the first)
and `hash` = sha256 of the record's canonical JSON without `hash` (sorted keys, no spaces, UTF-8),
and is written in that canonical form. Editing any byte of a record breaks its hash or its form;
removing or reordering records breaks the next record's `prev` and `seq`. `kiln audit verify FILE`
names the first record that does not hold. What a chain cannot show by itself is records cut from
the end: the server prints the head (`seq` and `hash`) when it stops, and `/metrics` exports the record count, so the head can be kept
elsewhere and compared (`kiln audit verify FILE --head HASH`).

Records: time (UTC), tenant and key id (never the key), the model name requested, the alias and
version that answered, HTTP status, finish reason, prompt and completion tokens, the W3C trace id
when the request carried one, and the prompt only when the operator opts in. One writer per file:
each replica of `kiln serve` logs to its own.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import IntegrityError

GENESIS = "0" * 64


def canonical(record: dict[str, Any]) -> str:
    """The one way a record is written: sorted keys, no spaces, UTF-8 (so any changed byte shows)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"}).encode()).hexdigest()


@dataclass(frozen=True)
class Verified:
    records: int
    head: str  # the last record's hash (GENESIS for an empty log)


def verify_lines(lines, where: str) -> Verified:
    """Check a chain; IntegrityError naming the first line and record that does not hold."""
    seq, prev = 0, GENESIS
    for number, line in enumerate(lines, 1):
        at = f"{where}: line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise IntegrityError(f"{at}: not a JSON record (edited or cut)") from None
        if not isinstance(record, dict) or not {"seq", "prev", "hash"} <= set(record):
            raise IntegrityError(f"{at}: not a request-log record (no seq/prev/hash)")
        if record["hash"] != record_hash(record) or line.rstrip("\n") != canonical(record):
            raise IntegrityError(f"{at} (record seq {record['seq']}): edited — its content does not match its hash")
        if record["prev"] != prev or record["seq"] != seq + 1:
            raise IntegrityError(f"{at} (record seq {record['seq']}): out of order, or a record before it was removed "
                                 f"(expected seq {seq + 1} chained to {prev[:12]}…, found seq {record['seq']} chained to "
                                 f"{str(record['prev'])[:12]}…)")
        seq, prev = record["seq"], record["hash"]
    return Verified(seq, prev)


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
    if head is not None and done.head != head and not (len(head) >= 12 and done.head.startswith(head)):
        raise IntegrityError(f"{path}: ends at seq {done.records} with hash {done.head[:16]}…, not at the head {head[:16]}… "
                             "kept elsewhere: records were cut from its end")
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
            record = {"seq": self.seq + 1, "time": datetime.now(timezone.utc).isoformat(timespec="milliseconds"), **fields,
                      "prev": self.prev}
            record["hash"] = record_hash(record)
            line = (canonical(record) + "\n").encode()
            os.write(self._fd, line)  # one write of the whole line, O_APPEND
            self.seq, self.prev = record["seq"], record["hash"]
        return record

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
