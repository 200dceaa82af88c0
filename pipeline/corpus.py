"""Calibration and evaluation text.

Built-in corpora, all offline, from different domains, so that a build is scored on text unlike the
text it was calibrated on:

- `pydoc-topics`: Python's language reference (`pydoc_data.topics`, shipped with every Python), the
  default calibration text. Its topics repeat whole paragraphs (a test found that a split by topic
  leaked eval text into calibration), so it is split by paragraph: every distinct paragraph goes to
  exactly one part, calibration or eval, chosen by a hash of its text, disjoint by construction and
  stable across machines. Its eval part is the in-domain figure, scored only when a recipe opts in.
- `package-readmes`: the opening of the long description (the PyPI README) of each distribution
  Kiln depends on: English prose about software, with code and lists, none of it Python's reference.
- `licenses`: the licence texts those distributions ship: English legal prose.

The last two are read from the installed distributions, whose versions Kiln pins; their text is
part of the validate stage's cache key (`text_fingerprint`) and of the eval token digest, so a
changed dependency can never pass for the same evaluation. Users may name a .txt or .jsonl file.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from pipeline.errors import RecipeError
from pipeline.hashing import sha256_bytes, sha256_file
from pipeline.recipe import CalibrationConfig, TextConfig, ValidateConfig

PARTS = ("calibration", "eval")
EVAL_SHARE = 5  # one distinct paragraph of pydoc-topics in five (by content hash) is held out for evaluation

# Kiln's direct dependencies (pyproject.toml), whose READMEs and licences make two corpora
DOCUMENTED_DISTRIBUTIONS = ("accelerate", "fastapi", "gguf", "httpx", "huggingface_hub", "llmcompressor", "matplotlib", "mlflow",
                            "numpy", "onnx", "onnxruntime", "opentelemetry-sdk", "prometheus_client", "pydantic", "PyYAML", "rich",
                            "safetensors", "tokenizers", "torch", "transformers", "tritonclient", "typer", "uvicorn")
README_OPENING_CHARS = 2500  # per README: many packages' prose in the first few thousand tokens, not one package's
MARKUP = re.compile(r"^\s*(<|!\[|\[!\[|\|)")  # HTML, images, badges, tables: layout, not prose

CORPUS_DOMAINS = {
    "pydoc-topics": "Python's language reference (pydoc_data.topics)",
    "package-readmes": "READMEs of Kiln's dependencies (PyPI long descriptions)",
    "licenses": "licence texts shipped by Kiln's dependencies",
}


def distinct_paragraphs(texts, seen: set[str] | None = None) -> list[str]:
    """Paragraphs of `texts` in order, each distinct one once."""
    seen = set() if seen is None else seen
    out = []
    for text in texts:
        for paragraph in re.split(r"\n\s*\n", text):
            paragraph = paragraph.strip()
            if paragraph and paragraph not in seen:
                seen.add(paragraph)
                out.append(paragraph)
    return out


def _distributions():
    import importlib.metadata as md

    for name in DOCUMENTED_DISTRIBUTIONS:
        try:
            yield md.distribution(name)
        except md.PackageNotFoundError:
            continue


def readme_paragraphs(opening_chars: int = README_OPENING_CHARS) -> list[str]:
    seen: set[str] = set()
    chosen = []
    for dist in _distributions():
        body = dist.metadata.get_payload() or dist.metadata.get("Description") or ""
        body = re.sub(r"<!--.*?-->", "", body, flags=re.S)  # comments (a licence header, notes to editors)
        prose = [p for p in distinct_paragraphs([body], seen) if not MARKUP.match(p)]
        size = 0
        for paragraph in prose:
            if size >= opening_chars:
                break
            chosen.append(paragraph)
            size += len(paragraph)
    return chosen


def license_paragraphs() -> list[str]:
    """Each distribution's own licence file (not the third-party ones bundled beside it)."""
    texts = []
    for dist in _distributions():
        for f in dist.files or []:
            own = f.parts[0].endswith(".dist-info") or len(f.parts) == 2
            if own and len(f.parts) <= 3 and re.match(r"(LICEN[CS]E|COPYING)", f.name.upper()):
                texts.append(Path(dist.locate_file(f)).read_text(encoding="utf-8", errors="replace"))
    return distinct_paragraphs(texts)


def builtin_paragraphs(part: str, corpus: str = "pydoc-topics") -> list[str]:
    """A built-in corpus's paragraphs for one part; only pydoc-topics is split into two parts,
    the others are one text for either use."""
    if corpus == "package-readmes":
        return readme_paragraphs()
    if corpus == "licenses":
        return license_paragraphs()
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
        text = "\n\n".join(builtin_paragraphs(part, cfg.corpus))
    if not text.strip():
        where = f"the {cfg.corpus!r} corpus (read from the installed distributions)" if cfg.file is None else "the file"
        raise RecipeError([f"{yaml_path}: the {part} text is empty: {where} has no text"])
    return text


def eval_token_ids(tokenizer, cfg: ValidateConfig) -> list[tuple[str, list[int]]]:
    """Each evaluation text's label and its first `max_eval_tokens` token ids (validate, benchmarks)."""
    return [(text.label, tokenizer(load_text(text, "eval", f"validate.eval_text.{i}"))["input_ids"][: cfg.max_eval_tokens])
            for i, text in enumerate(cfg.eval_text)]


def in_domain_labels(cfg: ValidateConfig, calibration: TextConfig | None) -> set[str]:
    """The evaluation texts that are the calibration text (scored only by opt-in, never pooled into
    the headline figures)."""
    return {t.label for t in cfg.eval_text if calibration is not None and t.same_text_as(calibration)}


def text_fingerprint(cfg: TextConfig) -> str | None:
    """Content hash of the text, for cache keys: a user file's bytes, a corpus read from installed
    distributions by its text (pydoc-topics is covered by the code version and Python's)."""
    if cfg.file is not None:
        return sha256_file(cfg.file) if cfg.file.is_file() else None
    if cfg.corpus in ("package-readmes", "licenses"):
        return sha256_bytes("\n\n".join(builtin_paragraphs("eval", cfg.corpus)).encode())
    return None


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
