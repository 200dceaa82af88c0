"""A request's state: checks of what it asks, its progress (generated ids, text sent), stop conditions."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


class RequestError(ValueError):
    """A request that cannot be served as asked; the message goes back to the client."""


@dataclass(frozen=True)
class Limits:
    context_limit: int  # prompt + generated tokens the engine's KV cache holds
    max_tokens_cap: int
    default_max_tokens: int
    max_prompt_chars: int | None = None  # longer prompts cannot fit the context: refused before tokenizing
    max_prompt_tokens: int | None = None  # the longest prompt one prefill takes (a TensorRT profile's maximum)


def prompt_char_limit(tokenizer, context_limit: int) -> int:
    """The longest prompt (in characters) that could fit `context_limit` tokens, so that a huge
    prompt is refused in microseconds instead of tokenized (measured: 50 MB took 50 s, holding the
    model's thread). A token covers at most as many characters as its longest vocabulary entry has
    (byte-level vocabularies spell one byte per character; `Ġ`/`▁` stand for one space); ×4 leaves
    room for normalizers that shorten text (NFC composes at most three characters into one)."""
    longest = max(len(piece) for piece in tokenizer.get_vocab(with_added_tokens=True))
    return context_limit * longest * 4


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    speculative: bool = True  # False: no drafts for this request where the package speculates


def parse_request(text: str, params: dict[str, Any], tokenizer, limits: Limits) -> GenerationRequest:
    """Check a request's prompt and sampling values; RequestError names the bad field and why."""
    if not text or not text.strip():
        raise RequestError("text_input is empty")
    max_tokens = int(params["max_tokens"]) if params.get("max_tokens") is not None else limits.default_max_tokens
    if not 1 <= max_tokens <= limits.max_tokens_cap:
        raise RequestError(f"max_tokens must be between 1 and {limits.max_tokens_cap}, got {max_tokens}")
    temperature = float(params.get("temperature", 0.0))
    if not np.isfinite(temperature) or temperature < 0:
        raise RequestError(f"temperature must be >= 0, got {temperature}")
    top_k = int(params.get("top_k", 0))
    if top_k < 0:
        raise RequestError(f"top_k must be >= 0 (0 = off), got {top_k}")
    top_p = float(params.get("top_p", 1.0))
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}")
    stop = tuple(s for s in params.get("stop", ()) if s)
    if limits.max_prompt_chars is not None and len(text) > limits.max_prompt_chars:
        raise RequestError(f"prompt of {len(text)} characters cannot fit the context limit of {limits.context_limit} tokens "
                           f"(at most {limits.max_prompt_chars} characters)")
    prompt_ids = tuple(tokenizer.encode(text).ids)
    if limits.max_prompt_tokens is not None and len(prompt_ids) > limits.max_prompt_tokens:
        raise RequestError(f"prompt ({len(prompt_ids)} tokens) is longer than this engine's prefill limit of "
                           f"{limits.max_prompt_tokens} tokens")
    if len(prompt_ids) + max_tokens > limits.context_limit:
        raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context limit "
                           f"of {limits.context_limit} tokens")
    seed = params.get("seed")
    return GenerationRequest(prompt_ids, max_tokens, temperature, top_k, top_p, None if seed is None else int(seed), stop,
                             bool(params.get("speculative", True)))


@dataclass
class Sequence:
    """One request's progress: generated ids, the text sent so far, and why it ended."""

    request: GenerationRequest
    rng: np.random.Generator
    ids: list[int] = field(default_factory=list)
    sent: str = ""
    finish_reason: str | None = None


def advance(seq: Sequence, token: int, tokenizer, eos_ids: set[int]) -> str:
    """Add one sampled token; returns the new text to send (possibly empty) and sets finish_reason.
    Text is decoded whole each time and sent from where the last send ended: byte-level tokens
    can complete a character only with the next token, so a trailing U+FFFD is held back until then
    (or until the sequence ends), as is anything that may still turn into a stop string."""
    if token in eos_ids:
        seq.finish_reason = "eos"
    else:
        seq.ids.append(token)
    text = tokenizer.decode(seq.ids, skip_special_tokens=True)
    hits = [h for h in (text.find(s, len(seq.sent)) for s in seq.request.stop) if h >= 0]
    if hits:
        text, seq.finish_reason = text[: min(hits)], "stop"
    elif seq.finish_reason is None and len(seq.ids) >= seq.request.max_tokens:
        seq.finish_reason = "length"
    if seq.finish_reason is None:
        hold = max((len(s) - 1 for s in seq.request.stop), default=0)
        text = text[: len(text) - hold] if hold else text
        if text.endswith("\ufffd"):
            return ""
    delta, seq.sent = text[len(seq.sent):], text
    return delta


def completion_tokens(sampled: int, finish_reason: str | None) -> int:
    """Tokens a response's `usage` counts: every sampled token but a final end-of-sequence one,
    which ends the text and is not part of it."""
    return sampled - (finish_reason == "eos")
