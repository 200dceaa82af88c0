"""Which served version answers a request: the names clients use, the canary split, stickiness.

A server of a whole registered model answers these names (`model` of an OpenAI request):
    NAME            the split of `--route` when one is set, else @production (else the newest
                    version while no version holds @production, as `kiln models pull NAME` does)
    NAME@ALIAS      the version the alias points to now
    NAME/VERSION    that version, while an alias points to it
Every answer carries the version that produced it (`NAME/VERSION`).

A split (`production:90,staging:10`) chooses an alias per request: by a hash of the caller's
identity (the OpenAI `user` field, else its Authorization header) so one caller always lands on the
same alias, on every replica with the same seed; requests without an identity draw from a seeded
generator. Pure logic, no I/O: the fleet (fleet.py) publishes a new `Routes` whenever an alias
moves or the split changes, and a request reads whichever `Routes` is current (one reference swap,
no lock on the request path).
"""

from __future__ import annotations

import hashlib
import random
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import KilnError

DEFAULT_ALIAS = "production"
NEWEST = "newest"  # the pseudo-alias of bare NAME while no version holds @production
_ALIAS = re.compile(r"^[A-Za-z0-9_-]+$")
_BUCKETS = 10_000


class RouteError(KilnError):
    """A `--route` value or routes file that cannot be used."""

    exit_code = 2


@dataclass(frozen=True)
class Split:
    """Weights per alias for requests naming the bare model, e.g. {"production": 90, "staging": 10}."""

    weights: tuple[tuple[str, int], ...]

    @classmethod
    def parse(cls, text: str, where: str = "--route") -> "Split":
        weights = []
        for part in text.split(","):
            alias, sep, weight = part.strip().partition(":")
            if not sep or not _ALIAS.match(alias) or not weight.strip().isdigit():
                raise RouteError(f"{where}: {part.strip()!r} is not ALIAS:WEIGHT (e.g. production:90,staging:10; weights are "
                                 "non-negative integers)")
            weights.append((alias, int(weight)))
        return cls.of(dict(weights), where)

    @classmethod
    def of(cls, weights: dict[str, Any], where: str) -> "Split":
        clean = []
        for alias, weight in weights.items():
            if not isinstance(alias, str) or not _ALIAS.match(alias):
                raise RouteError(f"{where}: {alias!r} is not an alias name (letters, digits, '_' and '-')")
            if not isinstance(weight, int) or isinstance(weight, bool) or weight < 0:
                raise RouteError(f"{where}.{alias}: weight {weight!r} must be a non-negative integer")
            clean.append((alias, weight))
        if not clean or sum(w for _, w in clean) == 0:
            raise RouteError(f"{where}: the weights must add up to more than 0")
        return cls(tuple(clean))

    def among(self, available: set[str]) -> "Split | None":
        """The split over the aliases that exist now (an alias without a version gets no share)."""
        kept = tuple((a, w) for a, w in self.weights if a in available and w > 0)
        return Split(kept) if kept else None

    def choose(self, bucket: int) -> str:
        """The alias for a bucket in [0, _BUCKETS): weights laid end to end over the buckets."""
        total = sum(w for _, w in self.weights)
        edge = 0
        for alias, weight in self.weights:
            edge += weight * _BUCKETS
            if bucket * total < edge:
                return alias
        return self.weights[-1][0]

    def __str__(self) -> str:
        return ",".join(f"{a}:{w}" for a, w in self.weights)


def parse_route_option(text: str) -> tuple[str, Split]:
    """`--route NAME=production:90,staging:10`."""
    name, sep, split = text.partition("=")
    if not sep or not name.strip():
        raise RouteError(f"--route {text!r}: expected NAME=ALIAS:WEIGHT,... (e.g. --route my-model=production:90,staging:10)")
    return name.strip(), Split.parse(split, f"--route {name.strip()}")


def read_routes_file(path: Path) -> tuple[dict[str, Split], int | None]:
    """A serving YAML:  routes: {NAME: {production: 90, staging: 10}}  seed: 0  (both optional)."""
    import yaml

    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise RouteError(f"{path}: cannot read the routes file: {e}") from None
    if not isinstance(doc, dict) or set(doc) - {"routes", "seed"}:
        raise RouteError(f"{path}: top-level keys allowed: routes, seed (got {sorted(doc) if isinstance(doc, dict) else type(doc).__name__})")
    routes = doc.get("routes") or {}
    if not isinstance(routes, dict):
        raise RouteError(f"{path}: routes must map a model name to {{alias: weight}}")
    splits = {}
    for name, weights in routes.items():
        if not isinstance(weights, dict):
            raise RouteError(f"{path}: routes.{name} must map aliases to weights, e.g. {{production: 90, staging: 10}}")
        splits[str(name)] = Split.of(weights, f"{path}: routes.{name}")
    seed = doc.get("seed")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
        raise RouteError(f"{path}: seed must be an integer")
    return splits, seed


def identity_bucket(identity: str, seed: int) -> int:
    digest = hashlib.sha256(f"{seed}\0{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big") % _BUCKETS


@dataclass(frozen=True)
class Choice:
    target: Any  # what the gateway sends the request to (a gateway.Served)
    alias: str  # the alias that chose it ("" for NAME/VERSION, Routes.newest_label for bare NAME without @production)
    version: str


@dataclass(frozen=True)
class Routes:
    """One consistent view: the model's name, alias → version, version → target, and the split."""

    name: str
    aliases: dict[str, str]
    targets: dict[str, Any]  # version -> target
    split: Split | None = None
    newest: str | None = None  # the newest version, answered for bare NAME while no @production exists
    newest_label: str = NEWEST  # how answers and metrics name that choice ("pinned" on a one-version server)

    def default_alias(self) -> str | None:
        if DEFAULT_ALIAS in self.aliases:
            return DEFAULT_ALIAS
        return self.newest_label if self.newest is not None else None

    def version_of(self, alias: str) -> str | None:
        return self.newest if alias == self.newest_label else self.aliases.get(alias)

    def listing(self) -> list[dict]:
        """`/v1/models` entries: each name a client may send, with the version it resolves to now."""
        entries = []
        default = self.default_alias()
        if default is not None:
            entries.append((self.name, default, self.version_of(default)))
        entries += [(f"{self.name}@{a}", a, v) for a, v in sorted(self.aliases.items())]
        entries += [(f"{self.name}/{v}", "", v) for v in sorted(set(self.aliases.values()) | {self.newest} - {None}, key=int)]
        return [{"id": ident, "object": "model", "created": 0, "owned_by": "kiln", "root": f"{self.name}/{version}",
                 "kiln_alias": alias or None, "kiln_version": version, **({"kiln_split": str(self.split)} if ident == self.name and self.split else {})}
                for ident, alias, version in entries if version in self.targets]


@dataclass
class Router:
    """The current `Routes` and the choice per request. `publish` swaps the view atomically."""

    seed: int = 0
    routes: Routes | None = None
    _rng: random.Random = field(init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def __post_init__(self):
        self._rng = random.Random(self.seed)

    def publish(self, routes: Routes) -> None:
        self.routes = routes

    def reseed(self, seed: int) -> None:
        with self._lock:
            self.seed, self._rng = seed, random.Random(seed)

    def choose(self, requested: str, identity: str | None = None) -> Choice:
        """The target for a request naming `requested`; LookupError with what is served otherwise."""
        routes = self.routes  # one read: the whole request sees one view
        if routes is None:
            raise LookupError("no version is loaded yet")
        name, alias, version = self.parse(routes.name, requested)
        if version is not None:
            if version not in set(routes.aliases.values()) | {routes.newest} or version not in routes.targets:
                raise LookupError(f"version {version} of {name} is not served here (served: {served_names(routes)})")
            return Choice(routes.targets[version], "", version)
        if alias is None:
            split = routes.split.among(set(routes.aliases)) if routes.split else None
            if split is not None:
                alias = split.choose(identity_bucket(identity, self.seed) if identity else self._draw())
            else:
                alias = routes.default_alias()
                if alias is None:
                    raise LookupError(f"{name} has no @production version to answer {name!r}; name an alias (served: "
                                      f"{served_names(routes)})")
        version = routes.version_of(alias)
        if version is None or version not in routes.targets:
            raise LookupError(f"{name} has no alias @{alias} served here (served: {served_names(routes)})")
        return Choice(routes.targets[version], alias, version)

    def triton_model(self, requested: str) -> str | None:
        """The Triton model serving `requested` (NAME, NAME@ALIAS, NAME/VERSION) now; None for any
        other name (a Triton model's own name passes through unchanged)."""
        try:
            return self.choose(requested).target.triton_model
        except LookupError:
            return None

    def _draw(self) -> int:
        with self._lock:
            return self._rng.randrange(_BUCKETS)

    @staticmethod
    def parse(name: str, requested: str) -> tuple[str, str | None, str | None]:
        base, at, alias = requested.partition("@")
        base, slash, version = base.partition("/")
        if base != name or (at and not alias) or (slash and not version.isdigit()) or (at and slash):
            raise LookupError(f"model {requested!r} is not served here; this server serves {name} (NAME, NAME@ALIAS or NAME/VERSION)")
        return base, alias or None, version or None


def served_names(routes: Routes) -> str:
    return ", ".join(e["id"] for e in routes.listing()) or "none"
