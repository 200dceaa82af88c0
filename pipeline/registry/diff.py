"""Two registered versions side by side: metrics (from the metric table), gates, lineage and recipe
differences, for `kiln models diff`. Gates come from each version's validation report, downloaded
and checked against the digest recorded at registration."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.metric_table import METRICS, per_text_rows, task_rows
from pipeline.registry.fetch import fetch_validation

# version tags that are bookkeeping, not lineage
NOT_LINEAGE = ("kiln.audit.", "kiln.last_audit", "kiln.register_key")


@dataclass
class VersionDiff:
    a: str  # "NAME vN"
    b: str
    metrics: list[dict[str, Any]] = field(default_factory=list)  # label, a, b, change (b vs a), verdict
    gates: list[dict[str, Any]] = field(default_factory=list)  # gate, a, b (descriptions)
    lineage: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # differing tags only
    same_lineage: int = 0
    recipe: list[tuple[str, str | None, str | None]] = field(default_factory=list)  # differing recipe settings only

    def to_json(self) -> dict[str, Any]:
        return {"a": self.a, "b": self.b, "metrics": self.metrics, "gates": self.gates,
                "lineage": [{"tag": t, "a": x, "b": y} for t, x, y in self.lineage],
                "recipe": [{"setting": k, "a": x, "b": y} for k, x, y in self.recipe]}


def verified_gates(client, tracking_uri: str, mv) -> list[dict[str, Any]]:
    """The gates of the version's validation report, from a download that matches its registered digest."""
    with tempfile.TemporaryDirectory(prefix="kiln-diff-") as tmp:
        return json.loads((fetch_validation(client, tracking_uri, mv, Path(tmp)) / "validation.json").read_text())["gates"]


def changed(a: dict[str, str], b: dict[str, str]) -> list[tuple[str, str | None, str | None]]:
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def diff_versions(client, tracking_uri: str, mv_a, mv_b) -> VersionDiff:
    from pipeline.stages.validate import describe_gate

    run_a, run_b = client.get_run(mv_a.run_id), client.get_run(mv_b.run_id)
    out = VersionDiff(f"{mv_a.name} v{mv_a.version}", f"{mv_b.name} v{mv_b.version}")
    keys = {*run_a.data.metrics, *run_b.data.metrics}
    for row in (*METRICS, *per_text_rows(keys), *task_rows(keys)):
        a, b = run_a.data.metrics.get(row.key), run_b.data.metrics.get(row.key)
        if a is None and b is None:
            continue
        change = verdict = None
        if a is not None and b is not None:
            # a percentage changes by percentage points; anything else by percent of the first value
            change = f"{b - a:+.2f} pp" if row.unit == "%" else f"{100.0 * (b - a) / a:+.1f} %" if a else None
            verdict = "same" if a == b else ("better" if (b < a) == (row.better == "lower") else "worse")
        out.metrics.append({"metric": row.key, "label": row.label, "a": a, "b": b, "a_text": row.format(a), "b_text": row.format(b),
                            "change": change, "verdict": verdict})
    gates_a = {g["gate"]: g for g in verified_gates(client, tracking_uri, mv_a)}
    gates_b = {g["gate"]: g for g in verified_gates(client, tracking_uri, mv_b)}
    for gate in sorted(set(gates_a) | set(gates_b)):
        ga, gb = gates_a.get(gate), gates_b.get(gate)
        out.gates.append({"gate": gate, "a": ga and ("✓ " if ga["passed"] else "✗ ") + describe_gate(ga).split(": ", 1)[1],
                          "b": gb and ("✓ " if gb["passed"] else "✗ ") + describe_gate(gb).split(": ", 1)[1],
                          "a_passed": ga and ga["passed"], "b_passed": gb and gb["passed"]})
    lineage_a = {k: v for k, v in mv_a.tags.items() if not k.startswith(NOT_LINEAGE)}
    lineage_b = {k: v for k, v in mv_b.tags.items() if not k.startswith(NOT_LINEAGE)}
    out.lineage = changed(lineage_a, lineage_b)
    out.same_lineage = len(set(lineage_a) | set(lineage_b)) - len(out.lineage)
    out.recipe = changed(run_a.data.params, run_b.data.params)
    return out
