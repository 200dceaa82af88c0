"""Hash chains for audit records: each record carries `seq` (1, 2, …), `prev` (the previous record's
`hash`; 64 zeros for the first) and `hash` = sha256 of its canonical JSON without `hash` (sorted
keys, no spaces, UTF-8). Editing a record breaks its hash; removing or reordering records breaks
the next record's `prev` and `seq`. Used by the request log (serving/request_log.py) and the
registry's promotion audit (registry/promotion.py)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterable

from pipeline.errors import IntegrityError

GENESIS = "0" * 64


def canonical(record: dict[str, Any]) -> str:
    """The one way a record is written: sorted keys, no spaces, UTF-8 (so any changed byte shows)."""
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def record_hash(record: dict[str, Any]) -> str:
    return hashlib.sha256(canonical({k: v for k, v in record.items() if k != "hash"}).encode()).hexdigest()


def chained(record: dict[str, Any], seq: int, prev: str) -> dict[str, Any]:
    """`record` as the chain's next link after (seq - 1, prev)."""
    record = {**record, "seq": seq, "prev": prev}
    record["hash"] = record_hash(record)
    return record


@dataclass(frozen=True)
class Verified:
    records: int
    head: str  # the last record's hash (GENESIS for an empty chain)


def verify_lines(lines: Iterable[str], where: str, unit: str = "line") -> Verified:
    """Check a chain written one canonical record per line; IntegrityError naming the first
    line and record that does not hold."""
    seq, prev = 0, GENESIS
    for number, line in enumerate(lines, 1):
        at = f"{where}: {unit} {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise IntegrityError(f"{at}: not a JSON record (edited or cut)") from None
        if not isinstance(record, dict) or not {"seq", "prev", "hash"} <= set(record):
            raise IntegrityError(f"{at}: not a chained record (no seq/prev/hash)")
        if record["hash"] != record_hash(record) or line.rstrip("\n") != canonical(record):
            raise IntegrityError(f"{at} (record seq {record['seq']}): edited — its content does not match its hash")
        if record["prev"] != prev or record["seq"] != seq + 1:
            raise IntegrityError(f"{at} (record seq {record['seq']}): out of order, or a record before it was removed "
                                 f"(expected seq {seq + 1} chained to {prev[:12]}…, found seq {record['seq']} chained to "
                                 f"{str(record['prev'])[:12]}…)")
        seq, prev = record["seq"], record["hash"]
    return Verified(seq, prev)


def check_head(done: Verified, head: str | None, where: str) -> None:
    """Records cut from a chain's end show only against its head kept elsewhere."""
    if head is not None and done.head != head and not (len(head) >= 12 and done.head.startswith(head)):
        raise IntegrityError(f"{where}: ends at seq {done.records} with hash {done.head[:16]}…, not at the head {head[:16]}… "
                             "kept elsewhere: records were cut from its end")
