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


def completion_tokens(sampled: int, finish_reason: str | None) -> int:
    """Tokens a response's `usage` counts: every sampled token but a final end-of-sequence one,
    which ends the text and is not part of it."""
    return sampled - (finish_reason == "eos")


Emit = Callable[[str, "str | None"], None]  # (text delta, finish_reason or None)


@dataclass
class Row:
    """One request in an in-flight batch: its sequence, where its text goes, its own decode state
    when the engine cannot batch rows of different lengths."""

    seq: Sequence
    emit: Emit
    slot: int
    next_token: int = 0
    state: Any = None


class InflightBatch:
    """Requests join a running batch between decode steps and leave it the step they finish.

    `admit_many` prefills the requests that arrived since the last step together (apart from the
    running rows), sends each its first text and, on an engine that decodes rows of different
    lengths (`place`), copies their keys and values into free rows of the shared batch state; `step` advances every row by one token in one forward. A finished, stopped or cancelled
    row frees its slot at once. On other engines each row keeps its own state and `step` runs them
    in turn: no batching, but a new request still starts within one step instead of after the others.
    Greedy output is the same as the request alone (tested): a row only ever attends to itself.
    """

    def __init__(self, lm, tokenizer, eos_ids: set[int], slots: int):
        self.lm, self.tokenizer, self.eos_ids = lm, tokenizer, eos_ids
        self.batched = hasattr(lm, "place") and slots > 1
        self.rows: list[Row | None] = [None] * slots
        self.state = lm.empty_state(slots) if self.batched else None
        self.views: dict[int, Any] = {}  # leading-rows states by row count, made once each

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def free(self) -> int:
        return len(self.rows) - self.active

    def _finish(self, row: Row) -> None:
        self.rows[row.slot] = None

    def _sample_and_send(self, row: Row, logits: np.ndarray) -> None:
        token = sample(logits, row.seq.request, row.seq.rng)
        delta = advance(row.seq, token, self.tokenizer, self.eos_ids)
        row.emit(delta, row.seq.finish_reason)
        row.next_token = token
        if row.seq.finish_reason is not None:
            self._finish(row)

    def admit(self, request: GenerationRequest, emit: Emit) -> Row:
        """Prefill `request` and send its first text; it takes a free slot (check `free` first)."""
        return self.admit_many([(request, emit)])[0]

    def admit_many(self, arrivals: list[tuple[GenerationRequest, Emit]]) -> list[Row]:
        """Prefill requests that arrived together in one forward (rows right-padded, each at its
        own length), place each in a free slot and send each its first text. At most `free`."""
        if not arrivals:
            return []
        if not self.batched and len(arrivals) > 1:  # per-row states: each request prefilled alone
            return [row for arrival in arrivals for row in self.admit_many([arrival])]
        lengths = np.array([len(req.prompt_ids) for req, _ in arrivals])
        ids = np.zeros((len(arrivals), int(lengths.max())), dtype=np.int64)
        for j, (req, _) in enumerate(arrivals):
            ids[j, : lengths[j]] = req.prompt_ids
        logits, state = self.lm.forward(ids, None, **({"lengths": lengths} if len(arrivals) > 1 else {}))
        rows = []
        for j, (req, emit) in enumerate(arrivals):
            row = Row(Sequence(req, np.random.default_rng(req.seed)), emit, self.rows.index(None))
            self.rows[row.slot] = row
            if self.batched:
                self.lm.place(self.state, row.slot, state, source_row=j)
            else:
                row.state = state
            rows.append(row)
        for j, row in enumerate(rows):
            self._sample_and_send(row, logits[j, lengths[j] - 1])
        return rows

    def cancel(self, row: Row) -> None:
        """Stop a row now (its client went away): it gets finish_reason "cancelled" and frees its slot."""
        if self.rows[row.slot] is row:
            row.seq.finish_reason = "cancelled"
            self._finish(row)

    def step(self) -> None:
        """One token for every active row."""
        live = [r for r in self.rows if r is not None]
        if not live:
            return
        if not self.batched:
            for row in live:
                logits, row.state = self.lm.forward(np.asarray([[row.next_token]], dtype=np.int64), row.state)
                self._sample_and_send(row, logits[0, -1])
            return
        # the step covers rows up to the last live one (new requests take the lowest free row), so a
        # lightly loaded batch pays for its live rows, not for every slot
        used = max(row.slot for row in live) + 1
        ids = np.zeros((used, 1), dtype=np.int64)
        lengths = np.zeros(used, dtype=np.int32)  # free rows feed a dummy token with length 0
        for row in live:
            ids[row.slot, 0], lengths[row.slot] = row.next_token, 1
        if used not in self.views:
            self.views[used] = self.lm.leading_rows(self.state, used)
        view = self.views[used]
        view.cache["row_lengths"] = self.state.cache["row_lengths"][:used].copy()
        logits, view = self.lm.forward(ids, view, lengths=lengths)
        self.views[used] = view
        self.state.cache["row_lengths"][:used] = view.cache["row_lengths"]
        for row in live:
            self._sample_and_send(row, logits[row.slot, -1])


def generate(lm, requests: list[GenerationRequest], tokenizer, eos_ids: set[int],
             emit: Callable[[int, str, str | None], None], batch: bool = True, slots: int = 8) -> None:
    """Decode `requests` through one in-flight batch of `slots` rows (one row when not `batch`),
    admitting the next request whenever a row is free; `emit(index, text_delta, finish_reason)` is
    called as text arrives, with a non-None finish_reason exactly once per request."""
    running = InflightBatch(lm, tokenizer, eos_ids, slots if batch else 1)
    waiting = list(enumerate(requests))
    while waiting or running.active:
        arrivals, waiting = waiting[: running.free], waiting[running.free :]
        running.admit_many([(req, lambda d, f, i=i: emit(i, d, f)) for i, req in arrivals])
        running.step()
