"""Task benchmarks through lm-evaluation-harness (issue 25): Kiln's engine as an lm-eval model
(loglikelihood batched and one at a time, rolling loglikelihood, generate_until through the decode
engine), Kiln's offline tasks, gates per task, and the clear refusals."""

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.artifacts import read_manifest
from pipeline.errors import StageFailed
from pipeline.metrics import token_nll
from pipeline.modeling.hf import load_tokenizer
from pipeline.modeling.runtime import greedy_decode
from pipeline.recipe import TaskConfig
from pipeline.targets import get_target
from pipeline.task_eval import make_kiln_lm, task_metrics
from tests.conftest import TINY_RECIPE, run_kiln

pytest.importorskip("lm_eval")


class Request:  # what lm-eval hands a model: an Instance's args
    def __init__(self, *args):
        self.args = args


@pytest.fixture(scope="module")
def engine(tiny_run):
    engine_dir = tiny_run["paths"]["build"]
    meta = read_manifest(engine_dir)["meta"]
    tokenizer = load_tokenizer(engine_dir)
    return get_target(meta["target"]).load(engine_dir, meta), tokenizer


def by_hand(lm, tokenizer, context: str, continuation: str) -> float:
    """log P(continuation | context) from one forward of the whole text, as a reader would compute it."""
    head = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    logits, _ = lm.forward(np.asarray([whole[:-1]], dtype=np.int64), None)
    return -float(token_nll(logits[0, len(head) - 1:], np.asarray(whole[len(head):])).sum())


def test_loglikelihood_batched_equals_each_request_alone(engine):
    lm, tokenizer = engine
    items = [json.loads(line) for line in (Path("pipeline/eval_tasks/kiln_cloze.jsonl")).read_text().splitlines()[:6]]
    requests = [Request(item["context"], " " + choice) for item in items for choice in item["choices"]]
    kiln = make_kiln_lm(lm, tokenizer, 256, set())
    got = kiln.loglikelihood(requests)  # rows of different lengths, right-padded, 8 per forward (fused graph)
    assert len(got) == len(requests)
    scorer = lm.without_prefill() if hasattr(lm, "without_prefill") else lm
    for (logp, greedy), request in zip(got, requests):
        assert logp == pytest.approx(by_hand(scorer, tokenizer, *request.args), abs=2e-3)
        assert isinstance(greedy, bool)
    # the trailing space of a context belongs to the continuation (lm-eval's convention)
    moved = kiln.loglikelihood([Request(items[0]["context"] + " ", items[0]["choices"][0])])[0][0]
    assert moved == pytest.approx(got[0][0], abs=1e-5)


def test_rolling_loglikelihood_scores_every_token_once(engine):
    lm, tokenizer = engine
    text = "Permission is hereby granted, free of charge, to any person obtaining a copy of this software. " * 6
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > 128  # longer than one window of the 128-token limit below
    kiln = make_kiln_lm(lm, tokenizer, 128, set())
    (rolling,) = kiln.loglikelihood_rolling([Request(text)])
    short = kiln.loglikelihood_rolling([Request(text[:80])])[0]
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    head = [prefix] + tokenizer(text[:80], add_special_tokens=False)["input_ids"]
    scorer = lm.without_prefill() if hasattr(lm, "without_prefill") else lm
    logits, _ = scorer.forward(np.asarray([head[:-1]], dtype=np.int64), None)
    assert short == pytest.approx(-float(token_nll(logits[0], np.asarray(head[1:])).sum()), abs=2e-3)
    assert rolling < short < 0


def test_generate_until_runs_the_decode_engine_and_stops_at_until(engine):
    lm, tokenizer = engine
    kiln = make_kiln_lm(lm, tokenizer, 256, set())
    contexts = ["The software is provided", "Licensed under the Apache", "A unified API for"]
    got = kiln.generate_until([Request(c, {"until": ["\n"], "max_gen_toks": 12}) for c in contexts]
                              + [Request(contexts[0], {"until": ["e"], "max_gen_toks": 12})])
    for context, text in zip(contexts, got):
        ids, _, _ = greedy_decode(lm, np.asarray(tokenizer(context, add_special_tokens=False)["input_ids"]), 12, lambda: 0.0)
        assert text == tokenizer.decode(ids, skip_special_tokens=True).split("\n")[0]
    assert "e" not in got[3] and got[0].startswith(got[3])  # cut before its stop string


def test_a_task_gate_fails_on_a_drop_over_its_limit_and_names_it():
    task = TaskConfig(name="kiln_cloze", max_drop_points=2)
    engine = {"scores": {"acc": 0.40}, "higher_is_better": {"acc": True}}
    source = {"scores": {"acc": 0.45}, "higher_is_better": {"acc": True}}
    metrics, gate = task_metrics(task, engine, source)
    assert metrics == {"task/kiln_cloze/acc": 0.40, "task/kiln_cloze/source_acc": 0.45, "task/kiln_cloze/drop_points": pytest.approx(5.0)}
    assert not gate["passed"] and gate["gate"] == "tasks.kiln_cloze.max_drop_points"
    assert task_metrics(TaskConfig(name="kiln_cloze", max_drop_points=6), engine, source)[1]["passed"]
    with pytest.raises(StageFailed, match="has no metric 'f1'; it reports acc"):
        task_metrics(TaskConfig(name="kiln_cloze", metric="f1"), engine, source)


def test_validate_scores_offline_tasks_on_engine_and_source_and_gates_them(tiny_run):
    """The tiny recipe with Kiln's two offline tasks: scores in validation.json, the report, the
    MLflow run, and a max_drop_points gate whose verdict follows the measured drop."""
    tasks = "[{name: kiln_cloze, limit: 60, max_drop_points: 0}, {name: kiln_last_word, limit: 8}]"
    proc = run_kiln("run", str(TINY_RECIPE), "--set", f"validate.tasks={tasks}", artifacts=tiny_run["artifacts"])
    # this run's report (a failed gate leaves it in the cache, and no run summary names it)
    validate_dir = max((p.parent for p in (tiny_run["artifacts"] / "cache" / "validate").glob("*/validation.json")
                        if "kiln_last_word" in json.loads(p.read_text()).get("tasks", {})), key=lambda d: d.stat().st_mtime)
    validation = json.loads((validate_dir / "validation.json").read_text())
    m = validation["metrics"]
    assert 0 <= m["task/kiln_cloze/acc"] <= 1 and 0 <= m["task/kiln_cloze/source_acc"] <= 1
    assert m["task/kiln_last_word/exact_match"] >= 0
    drop = m["task/kiln_cloze/drop_points"]
    assert drop == pytest.approx(100 * (m["task/kiln_cloze/source_acc"] - m["task/kiln_cloze/acc"]))
    gate = next(g for g in validation["gates"] if g["gate"] == "tasks.kiln_cloze.max_drop_points")
    assert gate["passed"] == (drop <= 0)
    assert proc.returncode == (0 if drop <= 0 else 4), proc.stdout + proc.stderr
    if drop > 0:
        assert "tasks.kiln_cloze.max_drop_points: kiln_cloze acc drop vs source (points)" in proc.stdout
    report = (validate_dir / "report.md").read_text()
    assert "| kiln_cloze (60 items, 0-shot) | acc |" in report and "| kiln_last_word (8 items, 0-shot) | exact_match |" in report
    assert "Traceback" not in proc.stderr and "it/s]" not in proc.stdout + proc.stderr  # no library progress bars


def test_an_unknown_task_is_refused_at_check_with_the_nearest_name(tmp_path):
    proc = run_kiln("check", str(TINY_RECIPE), "--set", "validate.tasks=[{name: kiln_cloz}]", artifacts=tmp_path)
    out = " ".join(proc.stdout.split())
    assert proc.returncode == 2
    assert "validate.tasks.0.name: 'kiln_cloz' is not a task file nor an lm-eval task" in out and "did you mean 'kiln_cloze'?" in out
