"""The one description of every validation metric a user sees. Gates (`validate.gates`), promotion
limits (`promote`), the validation report, the run summary, the registry's columns and `kiln
models diff` all read this table; adding a metric is one row here plus its computation in the
validate stage (which writes it into validation.json and the MLflow run under `key`).

A gate is a `max_` or `min_` limit on the metric itself, by its direction; a promotion limit bounds
how much worse a challenger may be than the production version, as a percentage of the champion's
value (`pct`) or as an absolute difference (`abs`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal


@dataclass(frozen=True)
class Gate:
    field: str  # the recipe's `validate.gates` key
    default: float | None = None  # None: off unless the recipe sets it
    minimum: float = 0.0  # the smallest limit allowed (inclusive unless `strict`)
    strict: bool = False
    maximum: float | None = None


@dataclass(frozen=True)
class PromotionLimit:
    field: str  # the recipe's `promote` key
    default: float
    change: Literal["pct", "abs"]
    maximum: float | None = None
    help: str = ""


@dataclass(frozen=True)
class MetricRow:
    key: str  # in validation.json and the MLflow run's metrics
    label: str
    fmt: str  # how a value prints
    better: Literal["lower", "higher"]
    unit: str = ""
    gate: Gate | None = None
    promote: PromotionLimit | None = None
    column: str | None = None  # short header in `kiln models show` / registry records; None: not a column
    source_key: str | None = None  # the same quantity measured on the source (PyTorch), for side by side
    summary: bool = True  # a row of the report and the run summary

    @property
    def op(self) -> str:
        return "<=" if self.better == "lower" else ">="

    def format(self, value: float | None) -> str:
        return "-" if value is None else format(value, self.fmt)

    def worse_by(self, challenger: float, champion: float) -> float:
        """How much worse the challenger is, in the promotion limit's unit (positive = worse)."""
        sign = 1.0 if self.better == "lower" else -1.0
        diff = challenger - champion
        if self.promote is not None and self.promote.change == "pct":
            diff = 100.0 * diff / champion
        return sign * diff


METRICS: tuple[MetricRow, ...] = (
    MetricRow("engine_ppl", "perplexity (held-out)", ".3f", "lower", source_key="source_ppl",
              promote=PromotionLimit("max_ppl_increase_pct", 1.0, "pct", help="challenger perplexity vs production's, percent")),
    MetricRow("ppl_increase_pct", "perplexity increase vs source", "+.2f", "lower", unit="%", column="ppl Δ %",
              gate=Gate("max_ppl_increase_pct", default=10.0)),
    MetricRow("next_token_agreement", "next-token agreement", ".3f", "higher", column="agreement",
              gate=Gate("min_next_token_agreement", maximum=1.0),
              promote=PromotionLimit("max_agreement_drop", 0.01, "abs", maximum=1.0, help="next-token agreement with the source, absolute")),
    MetricRow("tokens_per_s", "tokens/s (decode, batch 1)", ".1f", "higher", column="tokens/s", source_key="source_tokens_per_s",
              gate=Gate("min_tokens_per_s", strict=True),
              promote=PromotionLimit("max_tokens_per_s_drop_pct", 10.0, "pct", maximum=100.0, help="decode tokens/s, percent")),
    MetricRow("speedup_vs_source", "decode speed vs source", ".2f", "higher", unit="x"),
    # package.speculative: the same latency runs with speculative decoding (validate measures both)
    MetricRow("speculative_tokens_per_s", "tokens/s with speculative decoding", ".1f", "higher"),
    MetricRow("speculative_speedup", "speculative vs plain decode", ".2f", "higher", unit="x"),
    MetricRow("speculative_mean_accepted", "drafted tokens accepted per verification", ".2f", "higher"),
    MetricRow("ttft_ms", "time to first token (ms)", ".1f", "lower", unit="ms", column="TTFT ms", source_key="source_ttft_ms",
              gate=Gate("max_ttft_ms", strict=True),
              promote=PromotionLimit("max_ttft_increase_pct", 25.0, "pct", help="time to first token, percent")),
    MetricRow("decode_p50_ms", "per-token p50 (ms)", ".2f", "lower", unit="ms"),
    MetricRow("decode_p95_ms", "per-token p95 (ms)", ".2f", "lower", unit="ms"),
    MetricRow("peak_rss_mb", "peak RSS (MB)", ".0f", "lower", unit="MB", source_key="source_peak_rss_mb",
              gate=Gate("max_peak_rss_mb", strict=True)),
    MetricRow("gpu_memory_mb", "GPU memory held (MB)", ".0f", "lower", unit="MB", gate=Gate("max_gpu_memory_mb", strict=True)),
    # written at registration (the engine folder's size), not by the validate stage
    MetricRow("engine_size_mb", "engine size (MB)", ".1f", "lower", unit="MB", column="size MB", summary=False),
)

# Accuracy is also measured on each evaluation text alone (validate: `eval/<text>/<key>`); those
# figures are these rows, per text: reported and compared, never gated or promoted on.
PER_TEXT = ("engine_ppl", "ppl_increase_pct", "next_token_agreement")
PER_TEXT_PREFIX = "eval/"


def per_text_key(text: str, key: str) -> str:
    return f"{PER_TEXT_PREFIX}{text}/{key}"


def per_text_rows(keys) -> list[MetricRow]:
    """The per-text rows for the texts that `keys` (metric keys of one or more runs) name, by text then table order."""
    texts = sorted({k[len(PER_TEXT_PREFIX):].rsplit("/", 1)[0] for k in keys if k.startswith(PER_TEXT_PREFIX) and k.count("/") >= 2})
    by_key = {m.key: m for m in METRICS}
    return [replace(by_key[key], key=per_text_key(text, key), label=f"{by_key[key].label} ({text})", gate=None, promote=None,
                    column=None, source_key=None, summary=False)
            for text in texts for key in PER_TEXT]


# lm-evaluation-harness tasks (validate.tasks): `task/<task>/<metric>` (the engine's score),
# `task/<task>/source_<metric>` and `task/<task>/drop_points`, gated per task by its own
# `max_drop_points`. Their rows are made from the keys a run has.
TASK_PREFIX = "task/"


def task_key(task: str, key: str) -> str:
    return f"{TASK_PREFIX}{task}/{key}"


def task_rows(keys) -> list[MetricRow]:
    """Rows for the task scores and drops that `keys` (metric keys of one or more runs) hold."""
    rows = []
    for key in sorted(k for k in keys if k.startswith(TASK_PREFIX) and k.count("/") == 2):
        task, metric = key[len(TASK_PREFIX):].split("/")
        if metric == "drop_points":
            rows.append(MetricRow(key, f"{task}: drop vs source (points)", "+.2f", "lower", summary=False))
        elif not metric.startswith("source_"):
            lower = "perplexity" in metric or metric == "bits_per_byte"
            rows.append(MetricRow(key, f"{task}: {metric}", ".4f", "lower" if lower else "higher", summary=False))
    return rows


BY_KEY = {m.key: m for m in METRICS}
GATED = tuple(m for m in METRICS if m.gate is not None)
PROMOTED = tuple(m for m in METRICS if m.promote is not None)
COLUMNS = tuple(m for m in METRICS if m.column is not None)


def side_by_side(metrics: dict) -> list[tuple[str, str, str]]:
    """(label, source value, engine value) for each measured metric of the table, in its order:
    the rows of the validation report and the run summary."""
    rows = []
    for row in METRICS:
        if row.summary and row.key in metrics:
            source = metrics.get(row.source_key) if row.source_key else None
            suffix = f" {row.unit}" if row.unit in ("%", "x") else ""  # other units are in the label
            rows.append((row.label, row.format(source) + suffix if source is not None else "", row.format(metrics[row.key]) + suffix))
    return rows
