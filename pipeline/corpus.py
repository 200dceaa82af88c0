"""Calibration and evaluation text.

Built-in: Python's language reference (`pydoc_data.topics`, shipped with every Python). Its topics
repeat whole paragraphs (a test found that a split by topic leaked eval text into calibration), so
the split is by paragraph: every distinct paragraph goes to exactly one part, chosen by a hash of
its text. The parts are disjoint by construction and stable across machines. Users may name a
.txt or .jsonl file instead.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from pipeline.errors import RecipeError
from pipeline.hashing import sha256_file
from pipeline.recipe import CalibrationConfig, TextConfig

PARTS = ("calibration", "eval")
EVAL_SHARE = 5  # one distinct paragraph in five (by content hash) is held out for evaluation


def builtin_paragraphs(part: str) -> list[str]:
    from pydoc_data.topics import topics

    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}")
    want_eval = part == "eval"
    seen: set[str] = set()
    chosen = []
    for name in sorted(topics):
        for paragraph in topics[name].split("\n\n"):
            text = paragraph.strip()
            if not text or text in seen:
                continue
            seen.add(text)
            if (hashlib.sha256(text.encode()).digest()[0] % EVAL_SHARE == 0) == want_eval:
                chosen.append(text)
    return chosen


def read_user_file(path: Path, field: str, yaml_path: str) -> str:
    if not path.is_file():
        raise RecipeError([f"{yaml_path}: file {str(path)!r} does not exist"])
    if path.suffix == ".jsonl":
        texts = []
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise RecipeError([f"{yaml_path}: {path}:{n} is not valid JSON ({e.msg})"]) from None
            if not isinstance(record, dict) or not isinstance(record.get(field), str):
                raise RecipeError([f"{yaml_path}: {path}:{n} has no string field {field!r}"])
            texts.append(record[field])
        return "\n\n".join(texts)
    return path.read_text()


def load_text(cfg: TextConfig, part: str, yaml_path: str) -> str:
    """The text for one part (`calibration` or `eval`); a user file is taken whole for the part it is named for."""
    if cfg.file is not None:
        text = read_user_file(cfg.file, cfg.field, f"{yaml_path}.file")
    else:
        text = "\n\n".join(builtin_paragraphs(part))
    if not text.strip():
        raise RecipeError([f"{yaml_path}: the {part} text is empty"])
    return text


def text_fingerprint(cfg: TextConfig) -> str | None:
    """Content hash of a user file, for cache keys (the built-in corpus is covered by the code version)."""
    return sha256_file(cfg.file) if cfg.file is not None and cfg.file.is_file() else None


def calibration_samples(tokenizer, cfg: CalibrationConfig) -> list[list[int]]:
    """`cfg.samples` non-overlapping windows of `cfg.seq_len` tokens from the calibration text,
    chosen with `cfg.seed` (the same recipe always calibrates on the same tokens)."""
    import numpy as np

    ids = tokenizer(load_text(cfg.text, "calibration", "quantize.calibration.text"))["input_ids"]
    windows = [ids[i : i + cfg.seq_len] for i in range(0, len(ids) - cfg.seq_len + 1, cfg.seq_len)]
    if len(windows) < cfg.samples:
        raise RecipeError([f"quantize.calibration: {cfg.samples} samples of {cfg.seq_len} tokens asked, but the "
                           f"calibration text has {len(ids)} tokens ({len(windows)} windows)"])
    chosen = np.random.default_rng(cfg.seed).choice(len(windows), size=cfg.samples, replace=False)
    return [windows[i] for i in sorted(chosen)]
