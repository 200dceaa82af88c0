"""Gated promotion through the `staging` and `production` aliases, rollback, and the audit trail.

- to staging: the version's validation passed, and its engine and validation report still match
  the sha256 manifests recorded at registration.
- to production: the same checks, the version holds `@staging`, and, when another version holds
  `@production`, challenger vs champion on the same eval tokens and hardware within the limits of
  the challenger recipe's `promote` section.
`--force` overrides the gates (never the integrity check) and says so in the record. Every attempt,
refused ones included, is recorded as one JSON artifact of the version's run (`audit/<time>-...json`)
and summed up in the version's `kiln.last_audit` tag, so the registry is the audit log. A model's
events are one hash chain (seq, prev, hash; head in the model's `kiln.audit_head` tag), which
`kiln audit verify models:/NAME` checks. The
production history (for rollback) and a one-line alias map (`kiln.aliases`, which MLflow's models
list shows in full) are tags on the registered model.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pipeline.chain import GENESIS, Verified, canonical, chained, check_head, verify_lines
from pipeline.errors import PromotionRefused
from pipeline.metric_table import PROMOTED
from pipeline.recipe import PromoteConfig
from pipeline.registry.fetch import fetch_version
from pipeline.registry.refs import VersionRef, resolve
from pipeline.registry.store import store_lock

Alias = Literal["staging", "production"]
HISTORY_TAG = "kiln.production_history"
ALIASES_TAG = "kiln.aliases"
LAST_AUDIT_TAG = "kiln.last_audit"
AUDIT_DIR = "audit"  # in the version's run artifacts, one JSON file per event
LEGACY_AUDIT_PREFIX = "kiln.audit."  # versions promoted before audit records became artifacts
AUDIT_HEAD_TAG = "kiln.audit_head"  # the registered model's newest chained audit event: seq, hash, where


@dataclass(frozen=True)
class ComparisonRow:
    metric: str  # the metric table's key
    label: str
    champion: float
    challenger: float
    change: float  # in the unit of `limit`, positive = worse
    limit: float
    unit: str

    @property
    def passed(self) -> bool:
        return self.change <= self.limit


@dataclass
class Decision:
    name: str
    version: str
    alias: Alias
    previous: str | None  # the version that held the alias before
    problems: list[str] = field(default_factory=list)
    comparison: list[ComparisonRow] = field(default_factory=list)

    @property
    def allowed(self) -> bool:
        return not self.problems and all(r.passed for r in self.comparison)

    def reasons(self) -> list[str]:
        failed = [f"{r.label} worse by {r.change:.3g} {r.unit} (limit {r.limit:g} {r.unit})" for r in self.comparison if not r.passed]
        return self.problems + failed


def compare(challenger: dict[str, float], champion: dict[str, float], policy: PromoteConfig) -> list[ComparisonRow]:
    """Challenger vs champion on every metric with a promotion limit (pipeline/metric_table.py)."""
    return [ComparisonRow(row.key, row.label, champion[row.key], challenger[row.key], row.worse_by(challenger[row.key], champion[row.key]),
                          getattr(policy, row.promote.field), "%" if row.promote.change == "pct" else "abs")
            for row in PROMOTED]


def policy_of(client, mv) -> PromoteConfig:
    """The `promote` section of the recipe that built this version (logged as run params)."""
    params = client.get_run(mv.run_id).data.params
    return PromoteConfig(**{k.removeprefix("promote."): v for k, v in params.items() if k.startswith("promote.")})


class Registry:
    """Promotion and rollback against one store. `workdir` holds verified downloads of versions."""

    def __init__(self, client, tracking_uri: str, workdir: Path, actor: str):
        self.client, self.tracking_uri, self.workdir, self.actor = client, tracking_uri, workdir, actor

    def verified_validation(self, mv) -> dict[str, Any]:
        """The version's validation.json, from a fresh download of its engine and report that
        matches the registered digests (a copy checked earlier proves nothing about the store now)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix=".check-") as tmp:
            fetched = fetch_version(self.client, self.tracking_uri, mv, Path(tmp) / "version", reuse=False)
            return json.loads((fetched.validation_dir / "validation.json").read_text())

    def holder(self, name: str, alias: str):
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None

    def decide(self, ref: VersionRef, alias: Alias) -> Decision:
        mv = resolve(self.client, ref)
        previous = self.holder(mv.name, alias)
        decision = Decision(mv.name, str(mv.version), alias, previous and str(previous.version))
        report = self.verified_validation(mv)  # IntegrityError here is never overridable
        failed = [g["gate"] for g in report["gates"] if not g["passed"]]
        if failed:
            decision.problems.append(f"validation did not pass (gates missed: {', '.join(failed)})")
        if alias == "production":
            staging = self.holder(mv.name, "staging")
            if staging is None or str(staging.version) != decision.version:
                on = f"version {staging.version}" if staging else "no version"
                decision.problems.append(f"version {decision.version} is not on staging (@staging is {on}); promote it to staging first")
            if previous is not None and str(previous.version) != decision.version:
                champion = self.verified_validation(previous)
                for what, a, b in (("eval tokens", report.get("eval_tokens_sha256"), champion.get("eval_tokens_sha256")),
                                   ("hardware", mv.tags.get("kiln.hardware"), previous.tags.get("kiln.hardware"))):
                    if a is None or a != b:
                        decision.problems.append(f"not comparable with production version {previous.version}: {what} differ ({a} vs {b})")
                decision.comparison = compare(report["metrics"], champion["metrics"], policy_of(self.client, mv))
        return decision

    def record(self, name: str, version: str, event: dict[str, Any]) -> None:
        """One audit event: a JSON artifact of the version's run, and a short tag on the version.
        The model's events form one hash chain (pipeline/chain.py) whose head is a registered-model
        tag; the caller holds the store lock, so two promotions never take the same place."""
        now = datetime.now(timezone.utc)
        event = {**event, "model": name, "version": str(version), "by": self.actor, "at": now.isoformat(timespec="milliseconds")}
        head = json.loads(self.client.get_registered_model(name).tags.get(AUDIT_HEAD_TAG, "null")) or {"seq": 0, "hash": GENESIS}
        event = chained(event, head["seq"] + 1, head["hash"])
        mv = self.client.get_model_version(name, version)
        file_name = f"{now.strftime('%Y%m%dT%H%M%S.%fZ')}-{event['action']}-{event['alias']}-v{version}.json"
        self.workdir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.workdir, prefix=".audit-") as tmp:
            path = Path(tmp) / file_name
            path.write_text(json.dumps(event, indent=2))
            self.client.log_artifact(mv.run_id, str(path), AUDIT_DIR)
        self.client.set_registered_model_tag(name, AUDIT_HEAD_TAG, json.dumps(
            {"seq": event["seq"], "hash": event["hash"], "version": str(version), "file": f"{AUDIT_DIR}/{file_name}"}))
        self.client.set_model_version_tag(name, version, LAST_AUDIT_TAG,
                                          f"{event['at']} {event['action']} @{event['alias']} {event['result']} by {self.actor} "
                                          f"({AUDIT_DIR}/{file_name})")

    def show_aliases(self, name: str) -> None:
        """The registered model's whole alias map as one tag: MLflow's models list shows only the
        first alias ("@staging: Version 1 +1"), its tags column shows this in full."""
        aliases = self.client.get_registered_model(name).aliases or {}
        text = ", ".join(f"@{a} → v{v}" for a, v in sorted(aliases.items())) or "none"
        self.client.set_registered_model_tag(name, ALIASES_TAG, text)

    def apply(self, decision: Decision, force: bool = False) -> str:
        """Record the decision on the version and move the alias if allowed (or forced). Returns
        the result: accepted, forced or refused."""
        result = "accepted" if decision.allowed else "forced" if force else "refused"
        with store_lock(self.tracking_uri):
            return self._apply(decision, result)

    def _apply(self, decision: Decision, result: str) -> str:
        self.record(decision.name, decision.version, {
            "action": "promote", "alias": decision.alias, "result": result, "previous_version": decision.previous,
            "reasons": decision.reasons(), "comparison": [asdict(r) | {"passed": r.passed} for r in decision.comparison]})
        if result == "refused":
            return result
        self.client.set_registered_model_alias(decision.name, decision.alias, decision.version)
        self.show_aliases(decision.name)
        if decision.alias == "production":
            history = self.history(decision.name)
            if not history or history[-1] != decision.version:
                self.set_history(decision.name, history + [decision.version])
        return result

    def history(self, name: str) -> list[str]:
        return json.loads(self.client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))

    def set_history(self, name: str, history: list[str]) -> None:
        self.client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))

    def rollback(self, name: str) -> tuple[str, str]:
        """Move `production` back to the version that held it before; returns (from, to)."""
        with store_lock(self.tracking_uri):
            return self._rollback(name)

    def _rollback(self, name: str) -> tuple[str, str]:
        current = self.holder(name, "production")
        if current is None:
            raise PromotionRefused(f"{name} has no @production version to roll back; promote one first: "
                                   f"kiln promote {name} VERSION --to production")
        history = self.history(name)
        if not history or history[-1] != str(current.version):
            raise PromotionRefused(f"@production of {name} is version {current.version}, but Kiln's production history is {history}: "
                                "the alias was moved outside Kiln; set it with `kiln promote --to production`")
        if len(history) < 2:
            raise PromotionRefused(f"{name} version {current.version} is the only production version so far; nothing to roll back to")
        target = history[-2]
        self.client.set_registered_model_alias(name, "production", target)
        self.show_aliases(name)
        self.set_history(name, history[:-1])
        self.record(name, str(current.version), {"action": "rollback", "alias": "production", "result": "rolled back from",
                                                 "to_version": target})
        self.record(name, target, {"action": "rollback", "alias": "production", "result": "restored",
                                   "previous_version": str(current.version)})
        return str(current.version), target


def audit_log(client, mv) -> list[dict[str, Any]]:
    """The version's audit events in time order: its run's audit/ artifacts (and, for versions
    promoted by earlier Kiln releases, the JSON tags those kept)."""
    events = [json.loads(v) for k, v in mv.tags.items() if k.startswith(LEGACY_AUDIT_PREFIX)]
    files = [a.path for a in client.list_artifacts(mv.run_id, AUDIT_DIR) if a.path.endswith(".json")]
    if files:
        with tempfile.TemporaryDirectory(prefix="kiln-audit-") as tmp:
            folder = Path(client.download_artifacts(mv.run_id, AUDIT_DIR, tmp))
            events += [json.loads((folder / Path(f).name).read_text()) for f in files]
    return sorted(events, key=lambda e: e["at"])


def verify_audit_chain(client, name: str) -> Verified:
    """Every chained audit event of registered model `name` (all its versions' `audit/` artifacts),
    checked in order against the chain and its head tag; IntegrityError naming the first event
    that was edited, removed or moved. Events from before the chain (no `hash`) are not part of it."""
    events = [e for mv in client.search_model_versions(f"name = '{name}'") for e in audit_log(client, mv) if "hash" in e]
    events.sort(key=lambda e: e["seq"])
    done = verify_lines([canonical(e) for e in events], f"{name}'s promotion audit", unit="event")
    head = json.loads(client.get_registered_model(name).tags.get(AUDIT_HEAD_TAG, "null"))
    check_head(done, head["hash"] if head else GENESIS, f"{name}'s promotion audit")
    return done
