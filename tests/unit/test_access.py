"""API keys, model grants, limits (tenants.py) and the hash-chained request log (request_log.py),
without a server: a fake clock for the buckets, real files for the keys and the log."""

from __future__ import annotations

import json

import pytest

from pipeline.errors import IntegrityError
from pipeline.serving.request_log import GENESIS, RequestLog, verify_file
from pipeline.serving.tenants import AuthError, KeysFileError, Limited, Tenants, may_call, new_key, read_keys_file, write_keys_file

KEYS = """\
tenants:
  acme:
    models: [chat-model]
    priority: critical
    requests_per_minute: 3
    max_concurrent: 2
  lab:
    models: ["chat-model@staging", "other/2"]
    priority: batch
    tokens_per_minute: 60
"""


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def keys(tmp_path):
    path = tmp_path / "keys.yaml"
    path.write_text(KEYS)
    doc = read_keys_file(path)
    acme = new_key(doc, "acme", "acme CI")
    lab = new_key(doc, "lab")
    write_keys_file(path, doc)
    return path, acme, lab


def test_grants_cover_a_whole_model_or_exactly_one_alias_or_version():
    assert may_call(["chat-model"], "chat-model") and may_call(["chat-model"], "chat-model@staging") and may_call(["chat-model"], "chat-model/3")
    assert may_call(["chat-model@staging"], "chat-model@staging")
    # bare NAME may be routed to any alias by a split: an alias grant does not cover it
    assert not may_call(["chat-model@staging"], "chat-model") and not may_call(["chat-model@staging"], "chat-model@production")
    assert not may_call(["chat-model"], "chat-model-2") and not may_call(["other/2"], "other/3")
    assert may_call(["*"], "anything@production")


def test_the_file_keeps_hashes_only_and_a_key_authenticates(keys):
    path, (acme_id, acme_key), _ = keys
    text = path.read_text()
    assert acme_key not in text and acme_key.split("-", 2)[2] not in text and acme_id in text
    assert path.stat().st_mode & 0o077 == 0  # readable by its owner only
    tenants = Tenants(path, log=lambda _: None)
    caller = tenants.authenticate(f"Bearer {acme_key}")
    assert (caller.tenant, caller.key_id, caller.config.priority) == ("acme", acme_id, "critical")
    for bad in (None, "", "Bearer ", f"Basic {acme_key}", f"Bearer {acme_key[:-1]}x", "Bearer kiln-000000000000-" + "A" * 43):
        with pytest.raises(AuthError):
            tenants.authenticate(bad)


def test_a_changed_file_takes_effect_and_a_broken_one_keeps_the_last(keys):
    path, (acme_id, acme_key), _ = keys
    lines = []
    tenants = Tenants(path, log=lines.append)
    doc = read_keys_file(path)
    new_id, new = new_key(doc, "lab")
    del doc.keys[acme_id]
    write_keys_file(path, doc)
    assert tenants.authenticate(f"Bearer {new}").tenant == "lab"
    with pytest.raises(AuthError):
        tenants.authenticate(f"Bearer {acme_key}")  # revoked
    path.write_text(path.read_text() + "  bogus: 1\n")
    assert tenants.authenticate(f"Bearer {new}").tenant == "lab"
    assert "the previous keys stay in force" in lines[-1] and "keys.bogus" in lines[-1]


@pytest.mark.parametrize("text, expected", [
    ("tenants:\n  a:\n    models: [m]\n    priority: urgent\n", "tenants.a.priority: 'urgent' is not one of critical, standard, batch"),
    ("tenants:\n  a:\n    models: [m]\n    rpm: 3\n", "tenants.a.rpm: unknown key; allowed keys: models, priority"),
    ("tenants:\n  a:\n    models: []\n", "tenants.a.models"),
    ("tenants:\n  a:\n    models: [m]\n    requests_per_minute: 0\n", "tenants.a.requests_per_minute"),
    ("tenants: {}\nkeys:\n  0123456789ab: {tenant: b, salt: '" + "0" * 32 + "', sha256: '" + "0" * 64 + "'}\n",
     "keys.0123456789ab.tenant: 'b' is not one of the file's tenants"),
    ("[1, 2]\n", "expected a mapping"),
    ("tenants: {a: [\n", "not YAML"),
])
def test_a_bad_keys_file_names_the_yaml_path(tmp_path, text, expected):
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(KeysFileError) as e:
        read_keys_file(path)
    assert expected in str(e.value)


def test_requests_per_minute_and_concurrency_hold_and_say_when_to_retry(keys):
    path, (_, acme_key), _ = keys
    clock = Clock()
    tenants = Tenants(path, log=lambda _: None, clock=clock)
    acme = tenants.authenticate(f"Bearer {acme_key}")
    tenants.admit(acme)
    tenants.admit(acme)
    with pytest.raises(Limited) as e:  # max_concurrent 2
        tenants.admit(acme)
    assert e.value.limit == "concurrency"
    tenants.release(acme, 0)
    tenants.admit(acme)  # the third of 3 per minute
    tenants.release(acme, 0)
    tenants.release(acme, 0)
    with pytest.raises(Limited) as e:
        tenants.admit(acme)
    assert (e.value.limit, e.value.retry_after) == ("requests", 20)  # one request refills in 60/3 s
    clock.now += 20
    tenants.admit(acme)


def test_tokens_per_minute_are_charged_from_real_usage(keys):
    path, _, (_, lab_key) = keys
    clock = Clock()
    tenants = Tenants(path, log=lambda _: None, clock=clock)
    lab = tenants.authenticate(f"Bearer {lab_key}")
    tenants.admit(lab)
    tenants.release(lab, 50)
    tenants.admit(lab)  # 10 of 60 left: still admitted
    tenants.release(lab, 40)  # now 30 in debt
    with pytest.raises(Limited) as e:
        tenants.admit(lab)
    assert (e.value.limit, e.value.retry_after) == ("tokens", 30)  # 60 per minute: one a second
    clock.now += 31
    tenants.admit(lab)
    assert tenants.remaining(lab) == {"x-ratelimit-limit-tokens": "60", "x-ratelimit-remaining-tokens": "1"}


def write_log(path, n=5):
    log = RequestLog(path)
    for i in range(n):
        log.append(tenant="acme", key_id="0123456789ab", model="m", status=200, prompt="secret prompt", completion_tokens=i)
    log.close()
    return path.read_text().splitlines(keepends=True)


def test_the_request_log_chains_and_continues_after_a_restart(tmp_path):
    path = tmp_path / "requests.jsonl"
    write_log(path, 3)
    log = RequestLog(path, with_prompts=True)
    assert log.seq == 3
    log.append(tenant="lab", model="m", status=429, prompt="kept when opted in")
    log.close()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4] and records[0]["prev"] == GENESIS
    assert "prompt" not in records[0] and records[3]["prompt"] == "kept when opted in"
    done = verify_file(path)
    assert done.records == 4 and done.head == records[-1]["hash"]
    assert verify_file(path, head=done.head[:16]).records == 4


@pytest.mark.parametrize("tamper, line", [
    (lambda lines: lines[:2] + [lines[2].replace('"completion_tokens":2', '"completion_tokens":3')] + lines[3:], 3),  # one edited byte
    (lambda lines: lines[:1] + [lines[1].replace('"status":', '"status": ')] + lines[2:], 2),  # a space: same JSON, other bytes
    (lambda lines: lines[:1] + lines[2:], 2),  # a record removed
    (lambda lines: lines[:1] + [lines[2], lines[1]] + lines[3:], 2),  # two swapped
    (lambda lines: lines[1:], 1),  # the first removed
    (lambda lines: lines[:4] + [lines[4][:-5] + "\n"], 5),  # cut inside a record
])
def test_any_edit_removal_or_reordering_is_named(tmp_path, tamper, line):
    path = tmp_path / "requests.jsonl"
    lines = write_log(path)
    path.write_text("".join(tamper(lines)))
    with pytest.raises(IntegrityError) as e:
        verify_file(path)
    assert f"line {line}" in str(e.value)
    with pytest.raises(IntegrityError):
        RequestLog(path)  # a server never extends a broken chain


def test_records_cut_from_the_end_show_against_the_kept_head(tmp_path):
    path = tmp_path / "requests.jsonl"
    lines = write_log(path)
    head = verify_file(path).head
    path.write_text("".join(lines[:3]))
    assert verify_file(path).records == 3  # the chain alone cannot tell
    with pytest.raises(IntegrityError, match="cut from its end"):
        verify_file(path, head=head)


def test_rows_go_to_the_highest_class_first_and_tenants_take_turns():
    from pipeline.engine import WaitingRoom

    room = WaitingRoom()
    for item, rank, tenant in (("b1", 2, "bulk"), ("s1", 1, "a"), ("a1", 1, "a"), ("a2", 1, "a"), ("c1", 0, "ops"), ("x1", 1, "b")):
        assert room.offer(item, rank, tenant) == (True, None)
    assert [room.get() for _ in range(6)] == ["c1", "s1", "x1", "a1", "a2", "b1"]  # a, b, a, a within standard


def test_a_full_room_refuses_batch_first_and_keeps_every_critical_request():
    import queue

    from pipeline.engine import WaitingRoom

    room = WaitingRoom()
    assert room.offer("b1", 2, "bulk", capacity=3) == (True, None)
    assert room.offer("b2", 2, "bulk", capacity=3) == (True, None)
    assert room.offer("s1", 1, "a", capacity=3) == (True, None)
    assert room.offer("b3", 2, "bulk", capacity=3) == (False, None)  # full: nothing below batch
    assert room.offer("c1", 0, "ops", capacity=3) == (True, "b2")  # the newest batch request gives up its place
    assert room.offer("c2", 0, "ops", capacity=3) == (True, "b1")
    assert room.offer("c3", 0, "ops", capacity=3) == (True, "s1")  # then standard
    assert room.offer("c4", 0, "ops", capacity=3) == (False, None)  # critical never pushes out critical
    assert len(room) == 3 and room.drain() == ["c1", "c2", "c3"]
    with pytest.raises(queue.Empty):
        room.get(block=False)
    room.offer("late", 1, "a")
    room.close()
    assert room.get() is None and room.drain() == ["late"]  # closed: the worker stops, what waited is handed back
