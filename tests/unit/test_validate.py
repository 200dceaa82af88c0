"""Metrics and gates: one function per metric, gates that fail the run with exit 4."""

import json
import math
from pathlib import Path

import numpy as np

from pipeline.artifacts import ValidationReport
from pipeline.metrics import LatencySummary, agreement, eval_windows, perplexity, token_nll
from pipeline.recipe import GatesConfig
from pipeline.stages.validate import evaluate_gates, gate_failures
from tests.conftest import TINY_RECIPE, run_kiln


def test_perplexity_of_uniform_logits_is_vocab_size():
    logits = np.zeros((5, 50))
    nll = token_nll(logits, np.arange(5))
    assert math.isclose(perplexity(nll.sum(), 5), 50.0, rel_tol=1e-9)


def test_agreement_and_windows():
    assert agreement(np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4])) == 0.75
    windows = eval_windows(list(range(10)), 4)
    assert [len(w) for w in windows] == [4, 4, 2]
    assert [len(w) for w in eval_windows(list(range(9)), 4)] == [4, 4]  # a 1-token tail predicts nothing


def test_latency_summary():
    s = LatencySummary.from_runs([0.1, 0.3, 0.2], [[0.01] * 10, [0.02] * 10, [0.01] * 10])
    assert math.isclose(s.ttft_ms, 200.0) and math.isclose(s.tokens_per_s, 100.0)
    assert math.isclose(s.decode_p50_ms, 10.0) and math.isclose(s.decode_p95_ms, 20.0)


def test_gates_compare_in_the_right_direction():
    metrics = {"ppl_increase_pct": 5.0, "next_token_agreement": 0.7, "tokens_per_s": 50.0, "ttft_ms": 10.0, "peak_rss_mb": 300.0}
    gates = evaluate_gates(GatesConfig(max_ppl_increase_pct=4, min_next_token_agreement=0.6, min_tokens_per_s=60,
                                       max_ttft_ms=20, max_peak_rss_mb=None), metrics)
    assert {g["gate"]: g["passed"] for g in gates} == {
        "max_ppl_increase_pct": False, "min_next_token_agreement": True, "min_tokens_per_s": False, "max_ttft_ms": True}
    report = ValidationReport(path=None, meta={"gates": gates})
    assert gate_failures(report) == ["max_ppl_increase_pct: perplexity increase vs source 5 is not <= 4",
                                     "min_tokens_per_s: tokens/s (decode, batch 1) 50 is not >= 60"]


def test_gate_on_an_unmeasured_metric_fails_and_says_so():
    # A GPU whose driver reports no per-process memory leaves gpu_memory_mb out of the metrics.
    gates = evaluate_gates(GatesConfig(max_ppl_increase_pct=10, min_next_token_agreement=None, max_gpu_memory_mb=4096),
                           {"ppl_increase_pct": 5.0})
    assert [(g["gate"], g["value"], g["passed"]) for g in gates] == [("max_ppl_increase_pct", 5.0, True),
                                                                     ("max_gpu_memory_mb", None, False)]
    assert gate_failures(ValidationReport(path=None, meta={"gates": gates})) == [
        "max_gpu_memory_mb: GPU memory held (MB) was not measured on this machine (limit <= 4096)"]


def test_failed_gate_exits_4_names_gate_value_limit_and_keeps_report(tiny_run):
    artifacts = tiny_run["artifacts"]
    proc = run_kiln("run", str(TINY_RECIPE), "--set", "validate.gates.min_tokens_per_s=1e12", artifacts=artifacts)
    assert proc.returncode == 4, proc.stdout + proc.stderr
    assert "min_tokens_per_s: tokens/s" in proc.stdout and "is not >= 1e+12" in proc.stdout
    for stage in ("source", "quantize", "export", "build"):
        assert f"✓ {stage}: reused" in proc.stdout
    assert "✗ validate: built in" in proc.stdout and "✓ validate" not in proc.stdout  # no tick before the failure
    assert "register:" not in proc.stdout  # a failed build is not registered
    report_dirs = [p for p in (artifacts / "cache" / "validate").iterdir() if (p / "validation.json").is_file()]
    failed = [json.loads((p / "validation.json").read_text()) for p in report_dirs]
    assert any(not g["passed"] for r in failed for g in r["gates"])


def test_warn_mode_registers_and_exits_0(tiny_run):
    proc = run_kiln("run", str(TINY_RECIPE), "--set", "validate.gates.min_tokens_per_s=1e12",
                    "--set", "validate.on_gate_failure=warn", artifacts=tiny_run["artifacts"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gate missed (on_gate_failure: warn)" in proc.stdout and "Gates missed (warn)" in proc.stdout


def test_unquantized_engine_matches_source_perplexity(tiny_run):
    """method none: the fp32 engine and PyTorch see the same weights, so accuracy must agree to
    float noise. Independent evidence that export, build and the scoring loop are right."""
    proc = run_kiln("run", str(TINY_RECIPE), "--set", "quantize.method=none", artifacts=tiny_run["artifacts"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tiny_run["artifacts"] / "last_run.json").read_text())
    m = summary["metrics"]
    assert abs(m["ppl_increase_pct"]) < 0.01 and m["next_token_agreement"] > 0.99
    engine_ops = json.loads((tiny_run["artifacts"] / "cache" / "build" / summary["stages"][3]["key"] / "manifest.json").read_text())
    assert "MatMulNBits" not in engine_ops["meta"]["op_counts"]


def test_ci_summary_is_printed_once_with_nested_headings(tiny_run, tmp_path):
    """Without $GITHUB_STEP_SUMMARY the markdown is the run's summary (not the tables and then it);
    the validation report's headings sit under the summary's."""
    proc = run_kiln("run", str(TINY_RECIPE), "--ci", artifacts=tiny_run["artifacts"], env={"GITHUB_STEP_SUMMARY": ""})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    headings = [line for line in proc.stdout.splitlines() if line.startswith("#")]
    assert headings == ["## Kiln: tiny-llama-int4-cpu (gates passed)", "### Validation report", "#### Gates"], headings
    assert "Source vs build" not in proc.stdout
    summary_file = tmp_path / "summary.md"
    proc = run_kiln("run", str(TINY_RECIPE), "--ci", artifacts=tiny_run["artifacts"], env={"GITHUB_STEP_SUMMARY": str(summary_file)})
    assert proc.returncode == 0 and "Source vs build" in proc.stdout and "## Kiln:" not in proc.stdout
    assert summary_file.read_text().startswith("## Kiln: tiny-llama-int4-cpu (gates passed)")


def test_each_eval_text_is_scored_apart_and_the_headline_pools_them(tiny_run):
    """Issue 25: the default evaluation texts (two domains unlike the calibration text) are each
    reported (validation.json, MLflow-bound metrics, report); the headline perplexity pools their
    tokens, so it lies between theirs; an in-domain text opted into is reported and kept out of it."""
    validation = json.loads((tiny_run["paths"]["validate"] / "validation.json").read_text())
    texts, metrics = validation["eval_texts"], validation["metrics"]
    assert sorted(texts) == ["licenses", "package-readmes"] and not any(t["in_domain"] for t in texts.values())
    assert sum(t["tokens"] for t in texts.values()) == validation["eval_tokens"]
    for key in ("engine_ppl", "source_ppl"):
        low, high = sorted(t[key] for t in texts.values())
        assert low <= metrics[key] <= high and low < high
        assert all(metrics[f"eval/{label}/{key}"] == t[key] for label, t in texts.items())
    report = (tiny_run["paths"]["validate"] / "report.md").read_text()
    assert "| package-readmes | READMEs of Kiln's dependencies" in report and "| licenses |" in report

    proc = run_kiln("run", str(TINY_RECIPE), "--set", "validate.eval_text=[{corpus: licenses}, {corpus: pydoc-topics}]",
                    "--set", "validate.allow_calibration_text=true", artifacts=tiny_run["artifacts"])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tiny_run["artifacts"] / "last_run.json").read_text())
    opted = json.loads((Path(next(s["path"] for s in summary["stages"] if s["stage"] == "validate")) / "validation.json").read_text())
    assert opted["eval_texts"]["pydoc-topics"]["in_domain"] and not opted["eval_texts"]["licenses"]["in_domain"]
    assert opted["metrics"]["engine_ppl"] == opted["eval_texts"]["licenses"]["engine_ppl"]  # the in-domain text stays out
    assert "pydoc-topics (in-domain: calibration text)" in (Path(summary["stages"][4]["path"]) / "report.md").read_text()
