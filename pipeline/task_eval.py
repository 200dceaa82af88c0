"""Task benchmarks through lm-evaluation-harness (`validate.tasks`): Kiln's engines and the source
model as an lm-eval model.

`KilnLM` answers lm-eval's three request kinds over any `CausalLM` of `pipeline/modeling/runtime.py`:

- `loglikelihood` and `loglikelihood_rolling`: forwards over the context and continuation, scored
  with the decode kernel as validate's perplexity is; batched (right-padded rows) on engines that
  take per-row lengths (the fused ONNX Runtime graph), one sequence per forward elsewhere.
- `generate_until`: Kiln's decode engine (`pipeline.engine.generate`, the in-flight scheduler the
  Triton and MLflow models run), greedy, rows batched, `until` as stop strings.

Tasks are lm-eval's: a registered name (its standard tasks, whose datasets come from the Hugging
Face Hub) or a task YAML on local files; Kiln's own offline tasks are in `pipeline/eval_tasks/`.
A relative `dataset_kwargs.data_files` path in a task YAML is read from the YAML's folder.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import MissingDependency, StageFailed
from pipeline.metrics import token_nll

KILN_TASKS = Path(__file__).parent / "eval_tasks"
SCORE_BATCH = 8  # rows per scoring forward: [8, 256, 49152] fp32 logits are 400 MB for SmolLM2


def require_lm_eval():
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise MissingDependency("validate.tasks needs lm-evaluation-harness: pip install lm-eval==0.4.13 "
                                "(Kiln's own environment has it)") from None


def make_kiln_lm(lm, tokenizer, max_length: int, eos_ids: set[int], slots: int = 8):
    """An lm-eval `LM` over `lm` (a CausalLM) and its Hugging Face `tokenizer`."""
    require_lm_eval()
    from lm_eval.api.model import LM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from pipeline.engine import GenerationRequest, generate

    scorer = lm.without_prefill() if hasattr(lm, "without_prefill") else lm  # the kernel perplexity is scored with
    batched = "lengths" in inspect.signature(scorer.forward).parameters
    prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def score(pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(log-probability of each continuation given its context, whether greedy would produce it)."""
        out: list[tuple[float, bool] | None] = [None] * len(pairs)
        rows = []
        for i, (context, continuation) in enumerate(pairs):
            whole = (context + continuation)[-(max_length + 1):]
            rows.append((i, whole[:-1], len(continuation)))
        rows.sort(key=lambda r: -len(r[1]))  # similar lengths together: less padding
        step = SCORE_BATCH if batched else 1
        for start in range(0, len(rows), step):
            group = rows[start:start + step]
            width = max(len(r[1]) for r in group)
            ids = np.zeros((len(group), width), dtype=np.int64)
            for b, (_, inputs, _) in enumerate(group):
                ids[b, :len(inputs)] = inputs
            if batched:
                logits, _ = scorer.forward(ids, None, np.asarray([len(r[1]) for r in group], dtype=np.int32))
            else:
                logits, _ = scorer.forward(ids, None)
            for b, (i, inputs, n) in enumerate(group):
                targets = np.asarray(pairs[i][1][-n:])
                scored = logits[b, len(inputs) - n:len(inputs)]
                out[i] = (-float(token_nll(scored, targets).sum()), bool((scored.argmax(axis=-1) == targets).all()))
        return out  # type: ignore[return-value]

    class KilnLM(LM):
        def loglikelihood(self, requests) -> list[tuple[float, bool]]:
            pairs = []
            for context, continuation in (r.args for r in requests):
                # lm-eval's convention (as its Hugging Face model): spaces at the end of the context
                # belong to the continuation, which is what the whole text's tokens say
                spaces = len(context) - len(context.rstrip())
                context, continuation = context[:len(context) - spaces], context[len(context) - spaces:] + continuation
                whole, head = encode(context + continuation), encode(context) if context else []
                if not head:
                    head, whole = [prefix_id], [prefix_id] + whole
                pairs.append((head, whole[len(head):]))
            return score(pairs)

        def loglikelihood_rolling(self, requests) -> list[float]:
            results = []
            for (text,) in (r.args for r in requests):
                windows = [make_disjoint_window(w) for w in
                           get_rolling_token_windows(encode(text), prefix_id, max_length, context_len=1)]
                results.append(sum(logp for logp, _ in score([(list(c), list(t)) for c, t in windows])))
            return results

        def generate_until(self, requests) -> list[str]:
            texts, asks = [""] * len(requests), []
            for context, gen_kwargs in (r.args for r in requests):
                kwargs = dict(gen_kwargs)
                until = kwargs.get("until", [])
                until = [until] if isinstance(until, str) else list(until)
                max_new = int(kwargs.get("max_gen_toks", 256))
                prompt = encode(context)[-(max_length - max_new):] or [prefix_id]
                asks.append(GenerationRequest(tuple(prompt), max_new, stop=tuple(until)))

            def emit(i: int, delta: str, finish: str | None) -> None:
                texts[i] += delta

            generate(lm, asks, tokenizer, eos_ids, emit, batch=hasattr(lm, "row_view"), slots=slots)
            return texts

    return KilnLM()


@contextlib.contextmanager
def quiet_progress_bars():
    """lm-eval and datasets draw tqdm bars on stderr (lm-eval passes `disable` itself, so tqdm's
    environment switch does not reach them); Kiln's own progress line says what runs. Errors are
    not lost: they are exceptions, which `run_tasks` reports."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def task_spec(name: str) -> str | dict[str, Any]:
    """What lm-eval loads for a task name: Kiln's own task or a task YAML as a config dict (with
    relative data files made absolute), else the name itself (one of lm-eval's registered tasks)."""
    path = task_spec_path(name)
    if isinstance(path, str):
        return name
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(path, resolve_func=True)
    files = (config.get("dataset_kwargs") or {}).get("data_files")
    if isinstance(files, dict):
        config["dataset_kwargs"]["data_files"] = {split: str((path.parent / f).resolve()) if isinstance(f, str) else f
                                                  for split, f in files.items()}
    return config


def kiln_task_names() -> list[str]:
    return sorted(f.stem for f in KILN_TASKS.glob("*.yaml"))


def unknown_task_problems(tasks) -> list[str]:
    """`kiln check`: task names that are neither a task file nor a task lm-eval knows. Indexing
    lm-eval's tasks takes seconds, so it happens only when a recipe names one of them."""
    import difflib

    registered = [(i, t) for i, t in enumerate(tasks) if isinstance(task_spec_path(t.name), str)]
    if not registered:
        return []
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    known = TaskManager().all_tasks
    problems = []
    for i, task in registered:
        if task.name not in known:
            hint = difflib.get_close_matches(task.name, [*known, *kiln_task_names()], n=1)
            problems.append(f"validate.tasks.{i}.name: {task.name!r} is not a task file nor an lm-eval task; Kiln's own: "
                            f"{', '.join(kiln_task_names())}" + (f" (did you mean {hint[0]!r}?)" if hint else ""))
    return problems


def task_spec_path(name: str) -> Path | str:
    """A task's YAML file (Kiln's own or a path), else its name (a registered lm-eval task)."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else KILN_TASKS / f"{name}.yaml"
    return path if path.is_file() else name


def task_fingerprint(name: str) -> str | None:
    """Content hash of a task on local files (its YAML and the data beside it), for validate's cache
    key; None for a registered lm-eval task (its version is lm-eval's, pinned)."""
    from pipeline.hashing import sha256_file

    path = task_spec_path(name)
    if isinstance(path, str):
        return None
    files = sorted(f for f in path.parent.iterdir() if f.is_file() and f.suffix in (".yaml", ".yml", ".json", ".jsonl", ".csv", ".txt", ".py"))
    return ",".join(f"{f.name}:{sha256_file(f)}" for f in files)


def run_tasks(kiln_lm, tasks, log) -> dict[str, dict[str, Any]]:
    """Each task's scores for one model, {task name: {"scores": {metric: value}, "higher_is_better":
    {metric: bool}}}: `tasks` are the recipe's `validate.tasks` entries. A task whose data cannot be
    read fails the stage with the reason."""
    require_lm_eval()
    from lm_eval import simple_evaluate

    for noisy in ("lm-eval", "lm_eval", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    scores = {}
    for task in tasks:
        spec = task_spec(task.name)
        try:
            with quiet_progress_bars():
                result = simple_evaluate(model=kiln_lm, tasks=[spec], num_fewshot=task.num_fewshot, limit=task.limit,
                                         log_samples=False, bootstrap_iters=0, random_seed=0, numpy_random_seed=0,
                                         torch_random_seed=0, fewshot_random_seed=0, verbosity="ERROR")
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; each becomes one clear line
            hint = ("" if isinstance(spec, dict) else
                    " (a registered lm-eval task reads its dataset from the Hugging Face Hub; offline, name a task YAML on "
                    "local files, e.g. one of pipeline/eval_tasks/)")
            raise StageFailed("validate", f"task {task.name!r} could not be evaluated: {type(e).__name__}: {str(e)[:400]}{hint}") from None
        name = spec["task"] if isinstance(spec, dict) else task.name
        found = result["results"].get(name)
        if found is None:
            raise StageFailed("validate", f"task {task.name!r}: lm-eval returned no results for {name!r} "
                                          f"(got {sorted(result['results'])}); a group of tasks is not supported, name one task")
        values = {key.split(",")[0]: float(v) for key, v in found.items()
                  if "," in key and "stderr" not in key and isinstance(v, (int, float)) and not math.isnan(float(v))}
        scores[task.name] = {"scores": values, "higher_is_better": dict(result.get("higher_is_better", {}).get(name, {}))}
        log(f"task {task.name}: " + ", ".join(f"{k} {v:.4f}" for k, v in values.items()))
    return scores


def task_metrics(task, engine: dict[str, Any], source: dict[str, Any]) -> tuple[dict[str, float], dict[str, Any] | None]:
    """One task's metrics (engine score, source score, drop in points: 100 × the score difference,
    in the direction that is worse) and its gate result, if the task has `max_drop_points`."""
    from pipeline.metric_table import task_key

    metric = task.metric or next(iter(engine["scores"]), None)
    if metric not in engine["scores"] or metric not in source["scores"]:
        raise StageFailed("validate", f"validate.tasks: task {task.name!r} has no metric {metric!r}; it reports "
                                      f"{', '.join(sorted(engine['scores'])) or 'none'}")
    higher = engine["higher_is_better"].get(metric, True)
    eng, src = engine["scores"][metric], source["scores"][metric]
    drop = 100.0 * ((src - eng) if higher else (eng - src))
    metrics = {task_key(task.label, metric): eng, task_key(task.label, f"source_{metric}"): src, task_key(task.label, "drop_points"): drop}
    gate = None
    if task.max_drop_points is not None:
        gate = {"gate": f"tasks.{task.label}.max_drop_points", "metric": task_key(task.label, "drop_points"),
                "label": f"{task.label} {metric} drop vs source (points)", "value": drop, "op": "<=",
                "limit": task.max_drop_points, "passed": bool(drop <= task.max_drop_points)}
    return metrics, gate


def task_outcomes(tasks, engine: dict[str, Any], source: dict[str, Any]) -> tuple[dict[str, float], list[dict], dict[str, Any]]:
    """Every task's metrics, gate results and report entry, from `run_tasks` on engine and source."""
    metrics, gates, results = {}, [], {}
    for task in tasks:
        figures, gate = task_metrics(task, engine[task.name], source[task.name])
        metrics |= figures
        gates += [gate] if gate else []
        results[task.label] = {"metric": task.metric or next(iter(engine[task.name]["scores"])), "engine": engine[task.name]["scores"],
                               "source": source[task.name]["scores"], "limit": task.limit, "num_fewshot": task.num_fewshot}
    return metrics, gates, results
