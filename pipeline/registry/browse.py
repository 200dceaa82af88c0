"""Registered versions as plain records (one dict per version or audit event), for `kiln models
show` and notebooks/registry_tour.ipynb alike."""

from __future__ import annotations

import json
from typing import Any

from pipeline.registry.promotion import AUDIT_PREFIX

# record field -> run metric
METRICS = {
    "ppl_increase_pct": "ppl_increase_pct",
    "agreement": "next_token_agreement",
    "tokens_per_s": "tokens_per_s",
    "ttft_ms": "ttft_ms",
    "size_mb": "engine_size_mb",
}


def version_records(client, name: str | None = None) -> list[dict[str, Any]]:
    """Every version of `name` (or of every registered model), oldest first per model."""
    models = [client.get_registered_model(name)] if name else client.search_registered_models(order_by=["name ASC"])
    records = []
    for model in models:
        # version search results carry no aliases; the registered model's alias -> version map does
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append("@" + alias)
        for mv in sorted(client.search_model_versions(f"name='{model.name}'"), key=lambda v: int(v.version)):
            metrics = client.get_run(mv.run_id).data.metrics
            records.append({
                "model": model.name,
                "version": int(mv.version),
                "aliases": " ".join(sorted(aliases.get(str(mv.version), []))),
                "method": mv.tags.get("kiln.quant_method"),
                "target": mv.tags.get("kiln.target"),
                "hardware": mv.tags.get("kiln.hardware"),
                **{field: metrics.get(metric) for field, metric in METRICS.items()},
                "validated": mv.tags.get("kiln.validation_passed"),
                "recipe_sha256": mv.tags.get("kiln.recipe_sha256"),
                "created_ms": mv.creation_timestamp,
            })
    return records


def audit_records(client, name: str | None = None) -> list[dict[str, Any]]:
    """Every promotion and rollback recorded on the versions, in time order."""
    models = [name] if name else [m.name for m in client.search_registered_models()]
    events = []
    for model in models:
        for mv in client.search_model_versions(f"name='{model}'"):
            for key, value in mv.tags.items():
                if key.startswith(AUDIT_PREFIX):
                    events.append({"model": model, "version": int(mv.version), **json.loads(value)})
    return sorted(events, key=lambda e: e["at"])
