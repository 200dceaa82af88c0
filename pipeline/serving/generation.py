"""Text generation on a built engine: request checks, sampling, stop conditions, batched decoding.

Needs only numpy and a `tokenizers.Tokenizer`: the Triton package copies this file unchanged into
the model repository (as `kiln_generation.py`, beside `kiln_runtime.py`), and Kiln's own tests
import it from here, so the server runs exactly the code the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np


class RequestError(ValueError):
    """A request that cannot be served as asked; the message goes back to the client."""


@dataclass(frozen=True)
class Limits:
    context_limit: int  # prompt + generated tokens the engine's KV cache holds
    max_tokens_cap: int
    default_max_tokens: int


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


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
    prompt_ids = tuple(tokenizer.encode(text).ids)
    if len(prompt_ids) + max_tokens > limits.context_limit:
        raise RequestError(f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context limit "
                           f"of {limits.context_limit} tokens")
    seed = params.get("seed")
    return GenerationRequest(prompt_ids, max_tokens, temperature, top_k, top_p, None if seed is None else int(seed), stop)


def sample(logits: np.ndarray, req: GenerationRequest, rng: np.random.Generator) -> int:
    """Greedy at temperature 0; otherwise softmax(logits / T) restricted to top-k and the top-p nucleus."""
    if req.temperature == 0:
        return int(logits.argmax())
    scaled = logits.astype(np.float64) / req.temperature
    order = np.argsort(-scaled)
    if req.top_k:
        order = order[: req.top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if req.top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), req.top_p) + 1)
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


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


def generate(lm, requests: list[GenerationRequest], tokenizer, eos_ids: set[int],
             emit: Callable[[int, str, str | None], None], batch: bool = True) -> None:
    """Decode `requests` together (rows of one batch, each at its own length) when `batch` and the
    engine supports per-row lengths; `emit(index, text_delta, finish_reason)` is called as text
    arrives, with a non-None finish_reason exactly once per request."""
    if len(requests) > 1 and not (batch and hasattr(lm, "max_sequence_length")):
        for i, req in enumerate(requests):  # the portable engine takes one sequence length per batch
            generate(lm, [req], tokenizer, eos_ids, lambda _i, d, f, i=i: emit(i, d, f))
        return
    seqs = [Sequence(r, np.random.default_rng(r.seed)) for r in requests]
    lengths = np.array([len(r.prompt_ids) for r in requests])
    ids = np.zeros((len(requests), int(lengths.max())), dtype=np.int64)
    for row, r in enumerate(requests):
        ids[row, : len(r.prompt_ids)] = r.prompt_ids
    kwargs = {"lengths": lengths} if len(requests) > 1 else {}
    logits, state = lm.forward(ids, None, **kwargs)
    last = logits[np.arange(len(requests)), lengths - 1]
    while True:
        next_ids = np.zeros((len(requests), 1), dtype=np.int64)
        for row, seq in enumerate(seqs):
            if seq.finish_reason is not None:
                continue
            token = sample(last[row], seq.request, seq.rng)
            delta = advance(seq, token, tokenizer, eos_ids)
            emit(row, delta, seq.finish_reason)
            next_ids[row, 0] = token
        active = np.array([s.finish_reason is None for s in seqs])
        if not active.any():
            return
        # Finished rows feed a dummy token with length 0: their cache stops growing.
        kwargs = {"lengths": active.astype(np.int32)} if len(requests) > 1 else {}
        logits, state = lm.forward(next_ids, state, **kwargs)
        last = logits[:, -1]
