"""The draft model of `package.speculative: {method: draft, draft_engine: FOLDER}`: another Kiln
engine (a build folder, or the `engine` folder `kiln models pull` writes for a registered version)
that drafts tokens for this recipe's engine to verify.

It is checked where it is first named (`kiln check`: it exists, matches its sha256 manifest, is a
fused ONNX Runtime CPU engine and has the source's vocabulary) and again wherever it meets the
built engine (validate and the package stage: its tokenizer against the engine's, token for
token), because drafts are token ids: a draft model of another vocabulary would propose ids that
mean other text.
"""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.artifacts import read_manifest, verify
from pipeline.errors import IntegrityError, RecipeError

FIELD = "package.speculative.draft_engine"
SAME_TOKENIZER = "drafts are token ids, so the draft model must share the target's tokenizer"


def draft_engine_folder(speculative) -> Path | None:
    """The draft engine folder a recipe's `package.speculative` names (None: no draft model)."""
    return Path(speculative.draft_engine) if speculative is not None and speculative.method == "draft" else None


def engine_problems(folder: Path) -> list[str]:
    """Why `folder` cannot draft (empty: it can): missing, not matching its manifest, or not an
    engine the scheduler can draft with (per-row KV buffers: the fused ONNX Runtime CPU graph)."""
    if not (folder / "manifest.json").is_file():
        return [f"{FIELD}: {str(folder)!r} is not a Kiln engine folder (no manifest.json); point it at a build folder or at "
                f"the engine folder of `kiln models pull NAME@ALIAS --dest DIR` (DIR/engine)"]
    try:
        manifest = verify(folder)
    except IntegrityError as e:
        return [f"{FIELD}: {e}"]
    except (ValueError, KeyError, TypeError, AttributeError):  # not JSON, or JSON without a file list and digest
        return [f"{FIELD}: {folder / 'manifest.json'} is not a Kiln manifest (no file list and digest): rebuild or pull the engine"]
    config = manifest.get("config", {})
    if config.get("target") != "onnxruntime-cpu" or config.get("graph") != "fused":
        return [f"{FIELD}: {folder} is a {config.get('target')} engine of graph {config.get('graph')}; a draft engine must be "
                f"onnxruntime-cpu with build.graph: fused (its KV rows are rolled back in place)"]
    if not (folder / "tokenizer.json").is_file():
        return [f"{FIELD}: {folder} has no tokenizer.json to compare vocabularies with"]
    return []


def vocabulary(tokenizer_file: Path) -> dict[str, int]:
    """Token text to id, special tokens included."""
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(tokenizer_file)).get_vocab(with_added_tokens=True)


def vocabulary_problem(draft_tokenizer: Path, target_tokenizer: Path, target_name: str) -> str | None:
    """Why the draft's tokens are not the target's (None: the same vocabulary, id for id)."""
    draft, target = vocabulary(draft_tokenizer), vocabulary(target_tokenizer)
    if draft == target:
        return None
    differing = sorted(t for t in set(draft) | set(target) if draft.get(t) != target.get(t))
    return (f"{FIELD}: the draft engine's vocabulary differs from {target_name} ({len(draft)} vs {len(target)} tokens, "
            f"{len(differing)} differ, e.g. {differing[:3]}): {SAME_TOKENIZER}")


def check_against_source(folder: Path, vocab_size: int | None, source_folder: Path | None) -> list[str]:
    """`kiln check`'s view: the folder is usable and its vocabulary is the source checkpoint's (its
    tokenizer.json token for token where the source is a folder that has one, else its size)."""
    problems = engine_problems(folder)
    if problems:
        return problems
    if source_folder is not None and (source_folder / "tokenizer.json").is_file():
        problem = vocabulary_problem(folder / "tokenizer.json", source_folder / "tokenizer.json", "the source checkpoint's")
        return [problem] if problem else []
    draft_size = json.loads((folder / "config.json").read_text()).get("vocab_size") if (folder / "config.json").is_file() else None
    if vocab_size is not None and draft_size != vocab_size:
        return [f"{FIELD}: the draft engine's vocabulary has {draft_size} tokens, the source checkpoint's {vocab_size}: "
                f"{SAME_TOKENIZER}"]
    return []


def checked_draft(folder: Path, target_tokenizer: Path) -> dict:
    """The draft folder's manifest, after every check (the package stage's, before copying it):
    RecipeError naming the recipe field otherwise."""
    problems = engine_problems(folder)
    if not problems:
        problem = vocabulary_problem(folder / "tokenizer.json", target_tokenizer, "this recipe's engine")
        problems = [problem] if problem else []
    if problems:
        raise RecipeError(problems)
    return read_manifest(folder)


def speculative_settings(speculative) -> dict | None:
    """A recipe's `package.speculative` as the scheduler takes it (`kiln_engine.Scheduler`), with a
    draft engine's folder made absolute and its manifest digest beside it, so a stage keyed on these
    settings is rebuilt when the draft engine changes."""
    if speculative is None:
        return None
    settings = speculative.model_dump(mode="json", exclude_none=True)
    folder = draft_engine_folder(speculative)
    if folder is not None:
        folder = folder.resolve()
        settings["draft_engine"] = str(folder)
        try:  # a missing or unreadable manifest is `kiln check`'s and the stages' refusal (engine_problems), not an error here
            settings["draft_digest"] = read_manifest(folder)["digest"]
        except (OSError, ValueError, KeyError, TypeError):
            settings["draft_digest"] = None
    return settings
