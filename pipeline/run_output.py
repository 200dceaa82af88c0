"""`kiln run --output DIR`: the run's deliverables in a folder the user names, as Olive,
optimum-cli and the onnxruntime-genai builder write theirs, instead of only under hashed cache
paths. Files are hard-linked from the cache entries (copied across filesystems), each folder keeps
its stage manifest, so `kiln serve DIR` and any sha256 check work on it as on the cache.

    DIR/engine/       the build stage's engine, tokenizer and session options
    DIR/validation/   report.md, validation.json, the figure
    DIR/triton/       the Triton package (model_repository/...), when the recipe has `package`
    DIR/run.json      the run summary (metrics, stages, registered version)
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.artifacts import link_tree
from pipeline.errors import RecipeError

MARKER = "run.json"
PARTS = {"build": "engine", "validate": "validation", "package": "triton"}


def check_output_dir(dest: Path) -> None:
    """Before any work: the folder is new, empty, or an earlier `--output` (which is replaced)."""
    if dest.exists() and (not dest.is_dir() or (any(dest.iterdir()) and not (dest / MARKER).is_file())):
        raise RecipeError([f"--output {dest}: exists and is not an earlier kiln output (no {MARKER}); "
                           "name a new or empty folder"])


def write_output(dest: Path, outcomes, summary: dict) -> None:
    """All of it, or nothing: written beside `dest`, then swapped in."""
    check_output_dir(dest)
    partial = dest.with_name(f".{dest.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    try:
        for outcome in outcomes:
            if outcome.name in PARTS:
                link_tree(outcome.artifact.path, partial / PARTS[outcome.name])
        (partial / MARKER).write_text(json.dumps(summary, indent=2))
        if dest.exists():
            shutil.rmtree(dest)
        partial.rename(dest)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
