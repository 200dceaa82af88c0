"""API keys and tenants for the OpenAI port: who may call which model, how often, how much.

The keys file (YAML) holds tenants and the salted hashes of their keys, never a key:

    tenants:
      acme:
        models: [smollm2-135m-int4]      # NAME (every alias and version), NAME@ALIAS, NAME/VERSION, or "*"
        priority: critical                # critical | standard | batch
        requests_per_minute: 600          # token buckets, refilled continuously; null: no limit
        tokens_per_minute: 200000         # prompt + completion tokens, counted from real usage
        max_concurrent: 16
    keys:
      3f9a0c1d2e4b:                       # the key's id: its public part, safe to log
        tenant: acme
        name: acme CI                     # a label for people
        salt: …                           # hex
        sha256: …                         # sha256(salt + secret), hex

A key is `kiln-<id>-<secret>`: the id finds its record, the secret (32 random bytes) is checked
against the hash in constant time. Keys carry 256 bits of randomness, so one salted SHA-256 is
enough (a slow password hash guards guessable secrets, which these are not). `kiln keys add`
writes a record and prints the key once.

The gateway re-reads the file when it changes (checked on each request: one stat), so a key added
or revoked takes effect without a restart; a file that no longer parses is reported and the last
good one stays in force.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pipeline.engine.waiting import CLASSES as PRIORITIES  # the order requests keep their place under overload
from pipeline.errors import KilnError

KEY_PATTERN = re.compile(r"kiln-([0-9a-f]{12})-([A-Za-z0-9_-]{43})")


class KeysFileError(KilnError):
    """A keys file that cannot be used, naming the YAML path and what is allowed."""

    exit_code = 2


class TenantConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    models: list[str] = Field(min_length=1)
    priority: Literal[PRIORITIES] = "standard"
    requests_per_minute: int | None = Field(default=None, ge=1)
    tokens_per_minute: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)


class KeyRecord(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenant: str
    name: str = ""
    salt: str = Field(pattern=r"^[0-9a-f]{32}$")
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class KeysDoc(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tenants: dict[str, TenantConfig] = Field(default_factory=dict)
    keys: dict[str, KeyRecord] = Field(default_factory=dict)


ALLOWED = {(): KeysDoc, ("tenants", "*"): TenantConfig, ("keys", "*"): KeyRecord}


def problems_of(err: ValidationError) -> list[str]:
    out = []
    for e in err.errors(include_url=False):
        loc = tuple(str(p) for p in e["loc"])
        path = ".".join(loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            owner = ALLOWED.get(tuple("*" if i == 1 else p for i, p in enumerate(loc[:-1])))
            allowed = ", ".join(owner.model_fields) if owner else ""
            out.append(f"{path}: unknown key; allowed keys: {allowed}")
        elif e["type"] == "literal_error":
            out.append(f"{path}: {e.get('input')!r} is not one of {', '.join(PRIORITIES)}")
        else:
            out.append(f"{path}: {e['msg']}")
    return out


def read_keys_file(path: Path) -> KeysDoc:
    import yaml

    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise KeysFileError(f"keys file {path}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise KeysFileError(f"keys file {path}: not YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise KeysFileError(f"keys file {path}: expected a mapping with `tenants` and `keys`")
    try:
        doc = KeysDoc.model_validate(raw)
    except ValidationError as e:
        raise KeysFileError(f"keys file {path}: " + "; ".join(problems_of(e))) from None
    for key_id, record in doc.keys.items():
        if not re.fullmatch(r"[0-9a-f]{12}", key_id):
            raise KeysFileError(f"keys file {path}: keys.{key_id}: a key id is 12 hex digits (what `kiln keys add` writes)")
        if record.tenant not in doc.tenants:
            raise KeysFileError(f"keys file {path}: keys.{key_id}.tenant: {record.tenant!r} is not one of the file's tenants "
                                f"({', '.join(doc.tenants) or 'none'})")
    return doc


def write_keys_file(path: Path, doc: KeysDoc) -> None:
    """Atomically (a server re-reading it never sees half a file), readable by its owner only."""
    import yaml

    body = yaml.safe_dump(doc.model_dump(mode="json", exclude_none=True), sort_keys=False, allow_unicode=True)
    header = "# Kiln keys file: tenants and salted hashes of their API keys (never a key). `kiln keys --help`.\n"
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(header + body)
    os.replace(tmp, path)


def hash_secret(salt_hex: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt_hex) + secret.encode()).hexdigest()


def new_key(doc: KeysDoc, tenant: str, name: str = "") -> tuple[str, str]:
    """A new key for `tenant`, recorded in `doc` by its hash; returns (key id, key)."""
    if tenant not in doc.tenants:
        raise KeysFileError(f"tenant {tenant!r} is not in the keys file (tenants: {', '.join(doc.tenants) or 'none'}); add it under "
                            f"`tenants:` first, e.g.\n  tenants:\n    {tenant}:\n      models: [MODEL]\n      priority: standard")
    key_id = secrets.token_hex(6)
    while key_id in doc.keys:
        key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_hex(16)
    doc.keys[key_id] = KeyRecord(tenant=tenant, name=name, salt=salt, sha256=hash_secret(salt, secret))
    return key_id, f"kiln-{key_id}-{secret}"


def may_call(patterns: list[str], requested: str) -> bool:
    """`NAME` allows every alias and version of NAME; `NAME@ALIAS` and `NAME/VERSION` only
    themselves (bare NAME may be routed to any alias by a split, so an alias grant does not cover
    it); `*` allows everything."""
    base = requested.partition("@")[0].partition("/")[0]
    return any(p == "*" or p == requested or p == base for p in patterns)


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_id: str
    config: TenantConfig


class AuthError(Exception):
    """401: no key, or not one of the file's."""


class TokenBucket:
    """`rate` per minute, holding at most `rate` (a minute's worth: the burst). Usage counted after a
    request may take the level below zero; the debt delays the next admission."""

    def __init__(self, per_minute: float, now: float):
        self.rate, self.capacity, self.level, self.at = per_minute / 60.0, per_minute, per_minute, now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.at) * self.rate)
        self.at = now

    def wait(self, need: float, now: float) -> float:
        """Seconds until `need` can be taken (0: now)."""
        self.refill(now)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


@dataclass
class TenantState:
    limits: tuple[float | None, float | None]  # (requests, tokens) per minute the buckets were made for
    requests: TokenBucket | None
    tokens: TokenBucket | None
    in_flight: int = 0


class Limited(Exception):
    """429: over a limit; `retry_after` in whole seconds, `limit` names which."""

    def __init__(self, message: str, retry_after: int, limit: str):
        super().__init__(message)
        self.retry_after, self.limit = retry_after, limit


@dataclass
class Tenants:
    """The keys file in force, re-read when it changes, and each tenant's buckets and in-flight
    count (kept across reloads; a changed limit starts a new bucket)."""

    path: Path
    log: Callable[[str], None] = print
    clock: Callable[[], float] = time.monotonic
    doc: KeysDoc = field(init=False)
    _stamp: tuple = field(init=False, default=())
    _state: dict[str, TenantState] = field(init=False, default_factory=dict)
    _lock: threading.Lock = field(init=False, default_factory=threading.Lock)

    def __post_init__(self):
        self.doc = read_keys_file(self.path)  # a bad file at start is an error, not a warning
        self._stamp = self.stamp()

    def stamp(self) -> tuple:
        try:
            st = self.path.stat()
        except OSError:
            return ()
        return st.st_mtime_ns, st.st_size, st.st_ino

    def current(self) -> KeysDoc:
        stamp = self.stamp()
        if stamp != self._stamp:
            with self._lock:
                if stamp != self._stamp:
                    self._stamp = stamp
                    try:
                        self.doc = read_keys_file(self.path)
                        self.log(f"keys file {self.path} re-read: {len(self.doc.tenants)} tenant(s), {len(self.doc.keys)} key(s)")
                    except KeysFileError as e:
                        self.log(f"{e} — the previous keys stay in force")
        return self.doc

    def authenticate(self, authorization: str | None) -> Caller:
        doc = self.current()
        scheme, _, key = (authorization or "").partition(" ")
        matched = KEY_PATTERN.fullmatch(key.strip()) if scheme.lower() == "bearer" else None
        record = doc.keys.get(matched[1]) if matched else None
        if record is None or not hmac.compare_digest(hash_secret(record.salt, matched[2]), record.sha256):
            raise AuthError("Incorrect API key provided: pass a Kiln key as `Authorization: Bearer kiln-…` (api_key in OpenAI clients)")
        return Caller(record.tenant, matched[1], doc.tenants[record.tenant])

    def state(self, caller: Caller) -> TenantState:
        state, cfg = self._state.get(caller.tenant), caller.config
        limits = (cfg.requests_per_minute, cfg.tokens_per_minute)
        if state is None or state.limits != limits:
            now = self.clock()
            self._state[caller.tenant] = state = TenantState(
                limits, TokenBucket(limits[0], now) if limits[0] else None, TokenBucket(limits[1], now) if limits[1] else None,
                state.in_flight if state else 0)
        return state

    def admit(self, caller: Caller) -> None:
        """Take one request and one concurrency slot, or raise Limited (nothing taken)."""
        with self._lock:
            state, now, cfg = self.state(caller), self.clock(), caller.config
            if cfg.max_concurrent is not None and state.in_flight >= cfg.max_concurrent:
                raise Limited(f"tenant {caller.tenant}: {cfg.max_concurrent} requests already in flight (max_concurrent)", 1,
                              "concurrency")
            if state.tokens is not None and (wait := state.tokens.wait(0, now)) > 0:  # admitted unless in debt
                raise Limited(f"tenant {caller.tenant}: tokens per minute ({cfg.tokens_per_minute:g}) used up", math.ceil(wait), "tokens")
            if state.requests is not None:
                if (wait := state.requests.wait(1, now)) > 0:
                    raise Limited(f"tenant {caller.tenant}: requests per minute ({cfg.requests_per_minute:g}) used up",
                                  math.ceil(wait), "requests")
                state.requests.level -= 1
            state.in_flight += 1

    def release(self, caller: Caller, tokens: int) -> None:
        """The request ended: its slot back, its prompt + completion tokens charged."""
        with self._lock:
            state = self.state(caller)
            state.in_flight = max(0, state.in_flight - 1)
            if state.tokens is not None and tokens:
                state.tokens.refill(self.clock())
                state.tokens.level -= tokens

    def remaining(self, caller: Caller) -> dict[str, str]:
        """OpenAI's x-ratelimit-* headers for the limits this tenant has."""
        with self._lock:
            state, now, headers = self.state(caller), self.clock(), {}
            for kind, bucket in (("requests", state.requests), ("tokens", state.tokens)):
                if bucket is not None:
                    bucket.refill(now)
                    headers[f"x-ratelimit-limit-{kind}"] = f"{bucket.capacity:g}"
                    headers[f"x-ratelimit-remaining-{kind}"] = str(max(0, int(bucket.level)))
            return headers
