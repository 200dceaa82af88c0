"""Registered versions as plain records (one dict per version or audit event), for `kiln models
show` and notebooks/registry_tour.ipynb alike."""

from __future__ import annotations

from typing import Any

from pipeline.metric_table import COLUMNS
from pipeline.registry.promotion import audit_log


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
                **{row.key: metrics.get(row.key) for row in COLUMNS},  # named as in validation.json
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
            events += [{**e, "model": model, "version": int(mv.version)} for e in audit_log(client, mv)]
    return sorted(events, key=lambda e: e["at"])


# label offsets (points) tried in turn around each marker until one overlaps no earlier label
_OFFSETS = [(6, 6), (6, -12), (-6, 6), (-6, -12), (6, 18), (6, -24), (-6, 18), (-6, -24), (18, 0), (-18, 0)]


def plot_accuracy_vs_speed(ax, records: list[dict[str, Any]]) -> list:
    """Perplexity increase against decode tokens/s, one marker per version, coloured by target.
    Speeds of different targets differ by orders of magnitude, so the speed axis is logarithmic;
    each label ("name vN @alias") takes the first offset around its marker that overlaps no label
    placed before it. Returns the label artists."""
    plotted = [r for r in records if r.get("tokens_per_s") and r.get("ppl_increase_pct") is not None]
    for target in sorted({r["target"] or "?" for r in plotted}):
        group = [r for r in plotted if (r["target"] or "?") == target]
        ax.scatter([r["tokens_per_s"] for r in group], [r["ppl_increase_pct"] for r in group], label=target, s=40)
    ax.set_xscale("log")
    ax.margins(x=0.35, y=0.1)  # room for the labels of the outermost markers
    ax.set_xlabel("decode tokens/s (batch 1, log scale)")
    ax.set_ylabel("perplexity increase vs source (%)")
    if plotted:
        ax.legend(title="target", loc="best")
    figure = ax.figure
    figure.canvas.draw()  # label sizes are known only once rendered
    renderer = figure.canvas.get_renderer()
    placed, labels = [], []
    for r in sorted(plotted, key=lambda r: (r["tokens_per_s"], r["ppl_increase_pct"])):
        text = f"{r['model']} v{r['version']}" + (f" {r['aliases']}" if r.get("aliases") else "")
        for offset in _OFFSETS:
            label = ax.annotate(text, (r["tokens_per_s"], r["ppl_increase_pct"]), textcoords="offset points",
                                xytext=offset, fontsize=7, ha="left" if offset[0] >= 0 else "right")
            box = label.get_window_extent(renderer)
            if not any(box.overlaps(other) for other in placed) or offset == _OFFSETS[-1]:
                placed.append(box)
                labels.append(label)
                break
            label.remove()
    return labels
