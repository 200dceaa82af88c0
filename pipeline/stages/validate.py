"""validate: accuracy of the built engine against the unquantized source, its latency, and gates.

Perplexity of source and engine on the same held-out tokens with the same windowing; next-token
agreement between them; time to first token, per-token decode p50/p95, tokens/s and peak RSS of
the engine (and, for comparison, of the PyTorch source). Gates are evaluated here and recorded; the
run's `check` hook turns failed gates into a non-zero exit after the report is written.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.artifacts import Engine, SourceCheckpoint, ValidationReport, write_json_atomic
from pipeline.corpus import CORPUS_DOMAINS, eval_token_ids, in_domain_labels
from pipeline.draft_engine import checked_draft
from pipeline.errors import QualityGateFailed
from pipeline.hashing import sha256_bytes
from pipeline.latency import measure_in_subprocess
from pipeline.memory import CHILD_PEAK_KEY, release_free_memory
from pipeline.metric_table import GATED, PER_TEXT, per_text_key, side_by_side, task_key
from pipeline.metrics import agreement, eval_windows, perplexity, token_nll
from pipeline.modeling.hf import load_causal_lm, load_tokenizer
from pipeline.modeling.runtime import CausalLM, TorchCausalLM
from pipeline.recipe import GatesConfig, TextConfig, ValidateConfig
from pipeline.runner import StageContext
from pipeline.targets import get_target


def score(lm: CausalLM, windows: list[np.ndarray], advance) -> tuple[float, int, np.ndarray]:
    """Summed NLL, predicted-token count and greedy predictions over all windows. An engine with a
    separate prompt kernel is scored with its decode kernel: the one that produces generated tokens."""
    lm = lm.without_prefill() if hasattr(lm, "without_prefill") else lm
    nll_sum, count, preds = 0.0, 0, []
    for w in windows:
        logits, _ = lm.forward(w[None, :], None)
        logits = logits[0, :-1]
        nll_sum += float(token_nll(logits, w[1:]).sum())
        count += len(w) - 1
        preds.append(logits.argmax(axis=-1))
        advance(1)
    return nll_sum, count, np.concatenate(preds)


def evaluate_gates(gates: GatesConfig, metrics: dict[str, float]) -> list[dict[str, Any]]:
    results = []
    for row in GATED:
        limit = getattr(gates, row.gate.field)
        if limit is None:
            continue
        # A gate never passes on a number nobody measured (e.g. a driver that reports no per-process
        # GPU memory): it fails and says so.
        value = metrics.get(row.key)
        ok = value is not None and (value <= limit if row.op == "<=" else value >= limit)
        results.append({"gate": row.gate.field, "metric": row.key, "label": row.label, "value": value, "op": row.op,
                         "limit": limit, "passed": bool(ok)})
    return results


def describe_gate(g: dict[str, Any]) -> str:
    if g["value"] is None:
        return f"{g['gate']}: {g['label']} was not measured on this machine (limit {g['op']} {g['limit']:g})"
    verb = g["op"] if g["passed"] else f"is not {g['op']}"
    return f"{g['gate']}: {g['label']} {g['value']:.4g} {verb} {g['limit']:g}"


def gate_failures(report: ValidationReport) -> list[str]:
    return [describe_gate(g) for g in report.meta["gates"] if not g["passed"]]


def enforce(on_failure: str, warn):
    """The run's check after validation: fail (exit 4) or warn, after the report is written."""

    def check(report: ValidationReport) -> None:
        failures = gate_failures(report)
        if failures and on_failure == "fail":
            raise QualityGateFailed(failures, str(report.file("report.md")))
        for f in failures:
            warn(f"[yellow]gate missed (on_gate_failure: warn):[/yellow] {f}")

    return check


def describe_text(text: TextConfig) -> str:
    return f"file {text.file.name}" if text.file is not None else CORPUS_DOMAINS[text.corpus]


def per_text_rows(meta: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per evaluation text: name, what it is, tokens, source and engine perplexity, increase, agreement."""
    return [(label + (" (in-domain: calibration text)" if t["in_domain"] else ""), t["domain"], str(t["tokens"]),
             f"{t['source_ppl']:.3f}", f"{t['engine_ppl']:.3f}", f"{t['ppl_increase_pct']:+.2f} %", f"{t['next_token_agreement']:.3f}")
            for label, t in meta.get("eval_texts", {}).items()]


def task_table_rows(metrics: dict[str, Any], meta: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per lm-eval task: name (limit, shots), its metric, source and engine scores, the drop."""
    rows = []
    for label, t in meta.get("tasks", {}).items():
        m = t["metric"]
        shown = f"{label} ({t['limit'] or 'all'} items, {t['num_fewshot']}-shot)"
        rows.append((shown, m, f"{t['source'][m]:.4f}", f"{t['engine'][m]:.4f}", f"{metrics[task_key(label, 'drop_points')]:+.2f}"))
    return rows


PER_TEXT_HEADER = ("eval text", "what it is", "tokens", "source ppl", "engine ppl", "ppl increase", "agreement")


def render_markdown(metrics: dict[str, Any], gates: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        "# Validation report", "",
        f"Target: `{meta['target']}`; eval tokens: {meta['eval_tokens']} in windows of {meta['window']}.", "",
        f"| metric | source (PyTorch {meta['source_dtype']}) | engine |", "|---|---|---|",
        *(f"| {label} | {src} | {eng} |" for label, src, eng in side_by_side(metrics)),
        "", "Perplexity and agreement above pool the evaluation texts' tokens (an in-domain text only when it is the "
        "only one); each text alone:", "",
        "| " + " | ".join(PER_TEXT_HEADER) + " |", "|---" * len(PER_TEXT_HEADER) + "|",
        *("| " + " | ".join(row) + " |" for row in per_text_rows(meta)),
    ]
    if meta.get("tasks"):
        lines += ["", "| task | metric | source | engine | drop (points) |", "|---|---|---|---|---|",
                  *("| " + " | ".join(row) + " |" for row in task_table_rows(metrics, meta))]
    lines += ["", "## Gates", ""]
    lines += [f"- {'✓' if g['passed'] else '✗'} {describe_gate(g)}" for g in gates] or ["- (none)"]
    return "\n".join(lines) + "\n"


def render_html(metrics: dict[str, Any], gates: list[dict[str, Any]], meta: dict[str, Any], figure_png: bytes) -> str:
    """The report as one self-contained HTML page (figure embedded), which MLflow's artifact view
    previews; report.md's relative image link shows only as text there."""
    import base64
    from html import escape

    rows = "".join(f"<tr><td>{escape(label)}</td><td>{escape(src)}</td><td>{escape(eng)}</td></tr>"
                   for label, src, eng in side_by_side(metrics))
    text_rows = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in per_text_rows(meta))
    text_header = "".join(f"<th>{escape(h)}</th>" for h in PER_TEXT_HEADER)
    task_rows = "".join("<tr>" + "".join(f"<td>{escape(cell)}</td>" for cell in row) + "</tr>" for row in task_table_rows(metrics, meta))
    task_table = ("<table><tr><th>task</th><th>metric</th><th>source</th><th>engine</th><th>drop (points)</th></tr>"
                  f"{task_rows}</table>\n") if task_rows else ""
    gate_items = "".join(f"<li class={'pass' if g['passed'] else 'fail'}>{'✓' if g['passed'] else '✗'} {escape(describe_gate(g))}</li>"
                         for g in gates) or "<li>(none)</li>"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Kiln validation report</title>
<style>body{{font-family:sans-serif;margin:1.5em;max-width:60em}} table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:.25em .6em;text-align:right}} td:first-child,th:first-child{{text-align:left}}
.pass{{color:#176f2c}} .fail{{color:#b00020}} ul{{list-style:none;padding-left:0}}</style></head>
<body><h1>Validation report</h1>
<p>Target: <code>{escape(meta['target'])}</code>; eval tokens: {meta['eval_tokens']} in windows of {meta['window']}.</p>
<table><tr><th>metric</th><th>source (PyTorch {escape(meta['source_dtype'])})</th><th>engine</th></tr>{rows}</table>
<p>Perplexity and agreement above pool the evaluation texts' tokens (an in-domain text only when it is the only one);
each text alone:</p>
<table><tr>{text_header}</tr>{text_rows}</table>
{task_table}<h2>Gates</h2><ul>{gate_items}</ul>
<h2>Latency and accuracy</h2>
<img alt="latency and accuracy" style="max-width:100%" src="data:image/png;base64,{base64.b64encode(figure_png).decode()}">
</body></html>
"""


def plot_latency_accuracy(path, metrics: dict[str, Any], eng_lat: dict[str, Any], src_lat: dict[str, Any] | None,
                          meta: dict[str, Any]) -> None:
    """The report's figure: per-token decode latency (engine vs source) and perplexity."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never a display
    import matplotlib.pyplot as plt

    fig, (lat_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    series = [("engine", eng_lat)] + ([("source (PyTorch)", src_lat)] if src_lat else [])
    for label, lat in series:
        steps = np.sort(np.asarray(lat["decode_ms"]))
        lat_ax.plot(steps, np.linspace(0, 1, len(steps)), label=f"{label}: p50 {lat['decode_p50_ms']:.1f} ms")
    lat_ax.set(xlabel="per-token decode latency (ms)", ylabel="fraction of tokens", title="decode latency (CDF)")
    lat_ax.legend()
    bars = acc_ax.bar([f"source {meta['source_dtype']}", "engine"], [metrics["source_ppl"], metrics["engine_ppl"]], color=["tab:gray", "tab:blue"])
    acc_ax.bar_label(bars, fmt="%.3f")
    acc_ax.set(ylabel="perplexity (held-out)",
               title=f"{metrics['ppl_increase_pct']:+.2f} % perplexity, agreement {metrics['next_token_agreement']:.3f}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate_tasks(cfg: ValidateConfig, lm: CausalLM, engine: Engine, ctx: StageContext, side: str) -> dict[str, Any]:
    """lm-evaluation-harness tasks on one model (`pipeline/task_eval.py`), with the engine's context
    limit, tokenizer and end-of-sequence ids for both sides."""
    if not cfg.tasks:
        return {}
    from pipeline.stages.package import context_limit, eos_token_ids
    from pipeline.task_eval import make_kiln_lm, run_tasks

    kiln_lm = make_kiln_lm(lm, load_tokenizer(engine.path), context_limit(engine), set(eos_token_ids(engine.path)))
    with ctx.progress(f"tasks ({side}): {', '.join(t.name for t in cfg.tasks)}", total=len(cfg.tasks)) as advance:
        results = run_tasks(kiln_lm, cfg.tasks, lambda line: (ctx.log(f"{side} {line}"), advance(1)))
    return results


def make_run(calibration_text: TextConfig, speculative: dict | None = None):
    """The stage's function for a recipe whose calibration text is `calibration_text` (an evaluation
    text that is the same text is reported as in-domain) and whose package decodes with
    `speculative` (its latency is then measured both ways)."""

    def run_validate(cfg: ValidateConfig, source: SourceCheckpoint, engine: Engine, *, ctx: StageContext) -> ValidationReport:
        return run(cfg, source, engine, ctx=ctx, calibration_text=calibration_text, speculative=speculative)

    return run_validate


def run(cfg: ValidateConfig, source: SourceCheckpoint, engine: Engine, *, ctx: StageContext,
        calibration_text: TextConfig | None = None, speculative: dict | None = None) -> ValidationReport:
    if speculative is not None and speculative["method"] == "draft":
        # the draft meets this engine here first: its manifest and vocabulary, before any work
        checked_draft(Path(speculative["draft_engine"]), engine.path / "tokenizer.json")
    tokenizer = load_tokenizer(engine.path)
    texts = [(label, ids, eval_windows(ids, cfg.window)) for label, ids in eval_token_ids(tokenizer, cfg)]
    for label, ids, windows in texts:
        ctx.log(f"eval text {label!r}: {len(ids)} tokens in {len(windows)} windows of {cfg.window}")

    target = get_target(engine.target)
    n_windows = sum(len(w) for _, _, w in texts)
    with ctx.progress("perplexity (engine)", total=n_windows) as advance:
        lm = target.load(engine.path, dict(engine.meta))
        eng_scores = [score(lm, windows, advance) for _, _, windows in texts]
    eng_tasks = evaluate_tasks(cfg, lm, engine, ctx, "engine")
    del lm
    release_free_memory()  # the engine's session is gone: its memory goes back before the source loads
    with ctx.progress("perplexity (source)", total=n_windows) as advance:
        lm = TorchCausalLM(load_causal_lm(source.model_dir, source.dtype))
        src_scores = [score(lm, windows, advance) for _, _, windows in texts]
    src_tasks = evaluate_tasks(cfg, lm, engine, ctx, "source")
    del lm

    def accuracy(src, eng) -> dict[str, float]:
        (src_nll, count, src_pred), (eng_nll, _, eng_pred) = src, eng
        source_ppl, engine_ppl = perplexity(src_nll, count), perplexity(eng_nll, count)
        return {"source_ppl": source_ppl, "engine_ppl": engine_ppl, "ppl_increase_pct": 100.0 * (engine_ppl - source_ppl) / source_ppl,
                "next_token_agreement": agreement(src_pred, eng_pred)}

    def pooled(scores):
        return sum(s[0] for s in scores), sum(s[1] for s in scores), np.concatenate([s[2] for s in scores])

    in_domain = in_domain_labels(cfg, calibration_text)
    per_text = {}
    for (label, ids, _), src, eng, text_cfg in zip(texts, src_scores, eng_scores, cfg.eval_text):
        per_text[label] = accuracy(src, eng) | {"tokens": len(ids), "predicted_tokens": src[1], "in_domain": label in in_domain,
                                                "domain": describe_text(text_cfg)}
        ctx.log(f"  {label}{' (in-domain: the calibration text)' if label in in_domain else ''}: perplexity "
                f"{per_text[label]['source_ppl']:.3f} → {per_text[label]['engine_ppl']:.3f} "
                f"({per_text[label]['ppl_increase_pct']:+.2f} %), agreement {per_text[label]['next_token_agreement']:.3f}")
    ids = texts[0][1]  # the latency prompt: the first text's opening

    prompt = ids[: cfg.latency.prompt_tokens]
    common = {"prompt_ids": prompt, "new_tokens": cfg.latency.new_tokens, "warmup": cfg.latency.warmup,
              "repeats": cfg.latency.repeats, "threads": engine.meta.get("session_options", {}).get("threads"),
              "tokenizer_file": str(engine.path / "tokenizer.json")}
    ctx.log(f"latency: {len(prompt)}-token prompt, {cfg.latency.new_tokens} new tokens, {cfg.latency.repeats} runs")
    runs = 1 + int(cfg.compare_source_speed) + int(speculative is not None)
    with ctx.progress(f"latency ({cfg.latency.warmup} warm-up + {cfg.latency.repeats} runs, a process per model)", total=runs) as advance:
        engine_spec = {**common, "backend": "engine", "target": engine.target, "engine_dir": str(engine.path), "engine_meta": dict(engine.meta)}
        eng_lat = measure_in_subprocess(engine_spec, ctx.out_dir, "engine")
        advance(1)
        spec_lat = None
        if speculative is not None:
            spec_lat = measure_in_subprocess({**engine_spec, "speculative": speculative}, ctx.out_dir, "engine_speculative")
            advance(1)
        src_lat = None
        if cfg.compare_source_speed:
            src_lat = measure_in_subprocess({**common, "backend": "torch", "model_dir": str(source.model_dir), "dtype": source.dtype},
                                            ctx.out_dir, "source")
            advance(1)

    # The headline figures (and gates) pool the out-of-domain texts' tokens; an in-domain text is
    # reported beside them, never mixed in, unless it is all there is.
    headline = [i for i, (label, _, _) in enumerate(texts) if label not in in_domain] or list(range(len(texts)))
    metrics = {
        **accuracy(pooled([src_scores[i] for i in headline]), pooled([eng_scores[i] for i in headline])),
        **{k: eng_lat[k] for k in ("ttft_ms", "decode_p50_ms", "decode_p95_ms", "tokens_per_s", "peak_rss_mb")},
    }
    for label, figures in per_text.items():
        metrics |= {per_text_key(label, k): figures[k] for k in ("source_ppl", *PER_TEXT)}
    if eng_lat.get("gpu_memory_mb") is not None:  # GPU targets: memory the engine's process holds on the GPU
        metrics["gpu_memory_mb"] = eng_lat["gpu_memory_mb"]
    if spec_lat:
        metrics |= {"speculative_tokens_per_s": spec_lat["tokens_per_s"], "speculative_speedup": spec_lat["tokens_per_s"] / eng_lat["tokens_per_s"],
                    "speculative_mean_accepted": spec_lat["drafts"]["mean_accepted_length"]}
        same = spec_lat["generated_ids"] == eng_lat["generated_ids"]
        spec_lat["greedy_identical"] = same
        ctx.log(f"speculative decoding ({speculative['method']}): {spec_lat['tokens_per_s']:.1f} vs {eng_lat['tokens_per_s']:.1f} tokens/s, "
                f"{spec_lat['drafts']['mean_accepted_length']:.2f} drafted tokens accepted per verification, greedy tokens "
                f"{'identical' if same else 'DIFFERENT'} to plain decoding")
    if src_lat:
        metrics |= {f"source_{k}": src_lat[k] for k in ("tokens_per_s", "ttft_ms", "peak_rss_mb")}
        metrics["speedup_vs_source"] = eng_lat["tokens_per_s"] / src_lat["tokens_per_s"]
    gates = evaluate_gates(cfg.gates, metrics)
    task_results = {}
    if cfg.tasks:
        from pipeline.task_eval import task_outcomes

        task_figures, task_gates, task_results = task_outcomes(cfg.tasks, eng_tasks, src_tasks)
        metrics |= task_figures
        gates += task_gates
    # What promotion compares against: two builds' accuracy numbers are comparable only on the same tokens.
    eval_digest = sha256_bytes(json.dumps([[label, list(map(int, ids))] for label, ids, _ in texts]).encode())
    meta = {"target": engine.target, "eval_tokens": sum(len(t[1]) for t in texts), "window": cfg.window,
            "predicted_tokens": sum(s[1] for s in src_scores), "eval_texts": per_text, "tasks": task_results,
            "source_dtype": source.dtype,
            "eval_tokens_sha256": eval_digest,
            "source_latency": src_lat and {k: v for k, v in src_lat.items() if k != "generated_ids"},
            "engine_generated_ids": eng_lat["generated_ids"], "source_generated_ids": src_lat and src_lat["generated_ids"],
            "speculative": spec_lat and {"settings": speculative, "drafts": spec_lat["drafts"],
                                         "greedy_identical": spec_lat["greedy_identical"]}}
    for g in gates:
        mark = "[green]✓[/green]" if g["passed"] else "[red]✗[/red]"
        ctx.log(f"{mark} {describe_gate(g)}")
    write_json_atomic(ctx.out_dir / "validation.json", {"metrics": metrics, "gates": gates, **meta})
    (ctx.out_dir / "report.md").write_text(render_markdown(metrics, gates, meta) + "\n![latency and accuracy](latency_accuracy.png)\n")
    plot_latency_accuracy(ctx.out_dir / "latency_accuracy.png", metrics, eng_lat, src_lat, meta)
    (ctx.out_dir / "report.html").write_text(render_html(metrics, gates, meta, (ctx.out_dir / "latency_accuracy.png").read_bytes()))
    child_peak = max(lat["peak_rss_mb"] for lat in (eng_lat, src_lat) if lat)
    return ValidationReport(path=ctx.out_dir, meta={"passed": all(g["passed"] for g in gates), "metrics": metrics,
                                                    CHILD_PEAK_KEY: round(child_peak, 1),
                                                    "gates": gates, "target": engine.target, "eval_tokens_sha256": eval_digest})
