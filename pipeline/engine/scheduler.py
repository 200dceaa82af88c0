"""The in-flight batch: requests join a running batch between steps and leave it the step they end.

Each `step` does two things:

1. **Prefill, chunked.** Up to `prefill_chunk` prompt tokens of the requests still being prefilled
   (oldest first), each request's chunk written straight into its own row of the batch's KV buffers.
   A long prompt takes several steps, so the running rows wait for at most one chunk per token,
   never for a whole long prompt. A chunk never leaves a one-token tail (see prefix_cache). The
   step a request's prompt is complete, its first token is sampled and sent, and its prompt's whole
   blocks go to the prefix cache.
2. **Decode.** One token for every request past its prompt, in one forward over the rows up to the
   last such one (rows still prefilling or free inside that range take a placeholder token whose
   key and value land where the next chunk writes anyway, and their lengths are kept).

**Speculative decoding** (`speculative`: prompt lookup, `drafter.PromptLookup`, or a draft model,
`drafter.DraftModel` over `draft_lm`, whose KV rows mirror the batch's): while a single row is
decoding, a draft of k tokens is verified in one forward of k + 1
tokens on the decode kernel (logits at every position). Tokens are sampled from the target's
logits position by position, exactly as k + 1 plain steps would sample them (same sampler, same
random stream), and kept while they equal the draft; the first that differs is kept too and ends
the step. The row's KV length is then set past the last kept input, so the rejected drafts' keys
and values are overwritten by the next step without any copy (on the portable graph, whose row
has its own state, the state is cut there: `lm.truncate`). With several rows decoding, steps
stay one token per row: a batched step already reads the weights once for all rows, and
verifying drafts for every row would multiply its attention and matmul work by k + 1.

KV memory follows live tokens: the engine's buffers are reserved for `slots` rows of the full
context, but memory is taken page by page as positions are written and a row's pages go back to
the operating system when its request ends (`lm.release_rows`). On an engine without per-row
buffers (`row_view`: the portable and TensorRT graphs) each request keeps its own state, its prompt
is prefilled whole, and rows decode in turn: no batching, but a new request still starts within one
step. Greedy output is the request's output alone (tested): a row only ever attends to itself.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np

from .drafter import AdaptiveDrafter, DraftModel, DraftStats, PromptLookup
from .prefix_cache import PrefixCache
from .request import GenerationRequest, Sequence, advance
from .sampler import sample

Emit = Callable[[str, "str | None"], None]  # (text delta, finish_reason or None)


@dataclass(eq=False)  # rows are compared by identity (deque.remove)
class Row:
    """One request in the batch: its sequence, where its text goes, how much of its prompt is in its
    KV row (`cached` of it from the prefix cache), and the token it decodes next (None while its
    prompt is being prefilled). `state`: its own decode state on engines that cannot batch rows."""

    seq: Sequence
    emit: Emit
    slot: int
    prompt_done: int = 0
    cached: int = 0
    next_token: int | None = None
    state: Any = None
    drafter: AdaptiveDrafter | None = None

    @property
    def prompt(self) -> tuple[int, ...]:
        return self.seq.request.prompt_ids


def chunk_size(remaining: int, budget: int) -> int:
    """Prompt tokens to prefill now: at most `budget`, never leaving a one-token tail, and at least
    two unless the whole prompt is one token (0: wait for the next step)."""
    if remaining <= 1:
        return remaining
    take = min(remaining, budget)
    if remaining - take == 1:
        take -= 1
    return take if take >= 2 else 0


class Scheduler:
    def __init__(self, lm, tokenizer, eos_ids: set[int], slots: int, *, prefill_chunk: int = 256, prefix_cache_bytes: int = 0,
                 speculative: dict | None = None, draft_lm=None):
        self.lm, self.tokenizer, self.eos_ids = lm, tokenizer, eos_ids
        self.prefill_chunk = prefill_chunk
        self.batched = hasattr(lm, "row_view")
        # {"method": "prompt_lookup" | "draft", "max_draft_tokens": k, "max_ngram": n}: on engines
        # whose rows roll back in place (row views) or whose states can be cut (`truncate`: the
        # portable graph); the others (TensorRT, a transformers model) keep plain decoding
        self.speculative = speculative if speculative and (self.batched or hasattr(lm, "truncate")) else None
        self.draft_stats = DraftStats()
        self.draft_lm, self.draft_state = None, None
        if self.speculative and self.speculative["method"] == "draft":
            if draft_lm is None or not hasattr(draft_lm, "row_view"):
                raise ValueError("speculative decoding with a draft model needs the draft engine (draft_lm), a fused-graph engine")
            self.draft_lm, self.draft_state = draft_lm, draft_lm.empty_state(slots)
            self.draft_views = [draft_lm.row_view(self.draft_state, slot, 1) for slot in range(slots)]
        self.rows: list[Row | None] = [None] * slots
        self.prefilling: deque[Row] = deque()
        self.state = lm.empty_state(slots) if self.batched else None
        self.views: dict[tuple[int, int], Any] = {}  # row-range states, made once each
        self.prefix_cache = PrefixCache(lm, prefix_cache_bytes) if self.batched and prefix_cache_bytes > 0 else None

    @property
    def active(self) -> int:
        return sum(r is not None for r in self.rows)

    @property
    def free(self) -> int:
        return len(self.rows) - self.active

    def admit(self, request: GenerationRequest, emit: Emit) -> Row:
        """`request` takes a free row (check `free` first); its prompt is prefilled from the next step."""
        return self.admit_many([(request, emit)])[0]

    def admit_many(self, arrivals: list[tuple[GenerationRequest, Emit]]) -> list[Row]:
        rows = []
        for request, emit in arrivals:
            row = Row(Sequence(request, np.random.default_rng(request.seed)), emit, self.rows.index(None))
            if self.speculative and request.speculative:
                row.drafter = self._drafter(row.slot)
            self.rows[row.slot] = row
            if self.prefix_cache is not None:
                row.prompt_done = row.cached = self.prefix_cache.load(self.state, row.slot, row.prompt)
                self.state.cache["row_lengths"][row.slot] = row.prompt_done
            self.prefilling.append(row)
            rows.append(row)
        return rows

    def _drafter(self, slot: int) -> AdaptiveDrafter:
        max_draft = self.speculative.get("max_draft_tokens", 8)
        if self.draft_lm is None:
            return PromptLookup(max_draft=max_draft, max_ngram=self.speculative.get("max_ngram", 3))
        view = self.draft_views[slot]  # the slot's draft row, empty (released when its last request ended)
        return DraftModel(max_draft=max_draft, lm=self.draft_lm,
                          state=type(view)({**view.cache, "row_lengths": np.zeros(1, dtype=np.int32)}, 0))

    def cancel(self, row: Row) -> None:
        """Stop a row now (its client went away): it gets finish_reason "cancelled" and frees its slot."""
        if self.rows[row.slot] is row:
            row.seq.finish_reason = "cancelled"
            self._finish(row)

    def step(self) -> None:
        """Prefill up to `prefill_chunk` prompt tokens, then one token for every decoding row."""
        self._prefill()
        self._decode()

    def _finish(self, row: Row) -> None:
        self.rows[row.slot] = None
        if row in self.prefilling:
            self.prefilling.remove(row)
        if self.batched:
            self.lm.release_rows(self.state, [row.slot])
        if self.draft_lm is not None:
            self.draft_lm.release_rows(self.draft_state, [row.slot])

    def _sample_and_send(self, row: Row, logits: np.ndarray) -> None:
        token = sample(logits, row.seq.request, row.seq.rng)
        delta = advance(row.seq, token, self.tokenizer, self.eos_ids)
        row.emit(delta, row.seq.finish_reason)
        row.next_token = token
        if row.seq.finish_reason is not None:
            self._finish(row)

    def _view(self, start: int, rows: int):
        """A state over batch rows [start, start + rows) carrying their current lengths."""
        view = self.views.get((start, rows))
        if view is None:
            view = self.views[(start, rows)] = self.lm.row_view(self.state, start, rows)
        view.cache["row_lengths"] = self.state.cache["row_lengths"][start:start + rows].copy()
        return view

    def _prefill(self) -> None:
        budget = self.prefill_chunk
        for row in list(self.prefilling):
            if self.batched:
                take = chunk_size(len(row.prompt) - row.prompt_done, budget)
                if not take:
                    break
                logits = self._prefill_chunk(row, take)
            else:  # its own state: the whole prompt in one forward, one prompt at least per step
                if budget <= 0:
                    break
                take = len(row.prompt)
                logits, row.state = self.lm.forward(np.asarray([row.prompt], dtype=np.int64), None)
                row.prompt_done = take
            budget -= take
            if row.prompt_done == len(row.prompt):
                self.prefilling.remove(row)
                if self.prefix_cache is not None:
                    self.prefix_cache.store(self.state, row.slot, row.prompt)
                self._sample_and_send(row, logits[0, -1])

    def _prefill_chunk(self, row: Row, take: int) -> np.ndarray:
        view = self._view(row.slot, 1)
        ids = np.asarray([row.prompt[row.prompt_done:row.prompt_done + take]], dtype=np.int64)
        logits, view = self.lm.forward(ids, view, last_only=True, kernel="prefill")
        self.state.cache["row_lengths"][row.slot] = view.cache["row_lengths"][0]
        row.prompt_done += take
        return logits

    def _decode(self) -> None:
        decoding = [r for r in self.rows if r is not None and r.next_token is not None]
        if not decoding:
            return
        if len(decoding) == 1 and decoding[0].drafter is not None and self._speculate(decoding[0]):
            return
        if not self.batched:
            for row in decoding:
                logits, row.state = self.lm.forward(np.asarray([[row.next_token]], dtype=np.int64), row.state)
                self._sample_and_send(row, logits[0, -1])
            return
        # the step covers rows up to the last decoding one (new requests take the lowest free row),
        # so a lightly loaded batch pays for its live rows, not for every slot
        used = max(row.slot for row in decoding) + 1
        ids = np.zeros((used, 1), dtype=np.int64)
        decodes = np.zeros(used, dtype=bool)
        for row in decoding:
            ids[row.slot, 0], decodes[row.slot] = row.next_token, True
        view = self._view(0, used)
        before = view.cache["row_lengths"]
        # the engine picks the kernel for one token per row: its batch graph for many rows, if it has one
        logits, view = self.lm.forward(ids, view)
        self.state.cache["row_lengths"][:used] = np.where(decodes, view.cache["row_lengths"], before)
        for row in decoding:
            self._sample_and_send(row, logits[row.slot, -1])

    def _speculate(self, row: Row) -> bool:
        """Verify a draft for `row` (the only decoding row); False: no draft, decode as usual."""
        past = int(self.state.cache["row_lengths"][row.slot]) if self.batched else row.state.length
        # the request's own limit; an engine with fixed buffers also stops at their end (a portable
        # engine's context limit is already within the request's: parse_request)
        room = min(row.seq.request.max_tokens - len(row.seq.ids), getattr(self.lm, "max_sequence_length", 1 << 62) - past) - 1
        draft = row.drafter.propose(np.asarray([*row.prompt, *row.seq.ids], dtype=np.int64), room)
        if not draft:
            return False
        ids = np.asarray([[row.next_token, *draft]], dtype=np.int64)
        if self.batched:
            logits, _ = self.lm.forward(ids, self._view(row.slot, 1), kernel="decode")
        else:
            logits, verified = self.lm.forward(ids, row.state)
        accepted, deltas = 0, []
        for position in range(len(draft) + 1):
            row.next_token = sample(logits[0, position], row.seq.request, row.seq.rng)
            deltas.append(advance(row.seq, row.next_token, self.tokenizer, self.eos_ids))
            if row.seq.finish_reason is not None or position == len(draft) or row.next_token != draft[position]:
                break
            accepted += 1
        # counted before the text goes out: the request's last message reports its drafts' counts
        row.drafter.update(len(draft), accepted)
        self.draft_stats.add(len(draft), accepted)
        for i, delta in enumerate(deltas):
            row.emit(delta, row.seq.finish_reason if i == len(deltas) - 1 else None)
        if row.seq.finish_reason is not None:
            self._finish(row)
        elif self.batched:  # keys and values up to the last kept input; the rest is overwritten later
            self.state.cache["row_lengths"][row.slot] = past + 1 + accepted
        else:
            row.state = self.lm.truncate(verified, past + 1 + accepted)
        return True


def generate(lm, requests: list[GenerationRequest], tokenizer, eos_ids: set[int],
             emit: Callable[[int, str, str | None], None], batch: bool = True, slots: int = 8, **options) -> None:
    """Decode `requests` through one scheduler of `slots` rows (one row when not `batch`), admitting
    the next request whenever a row is free; `emit(index, text_delta, finish_reason)` is called as
    text arrives, with a non-None finish_reason exactly once per request. `options`: the
    scheduler's (prefill_chunk, prefix_cache_bytes)."""
    running = Scheduler(lm, tokenizer, eos_ids, slots if batch else 1, **options)
    waiting = list(enumerate(requests))
    while waiting or running.active:
        arrivals, waiting = waiting[: running.free], waiting[running.free :]
        running.admit_many([(req, lambda d, f, i=i: emit(i, d, f)) for i, req in arrivals])
        running.step()


def timed_greedy(lm, tokenizer, prompt_ids, new_tokens: int, clock, drafts: DraftStats | None = None,
                 **options) -> tuple[list[int], float, list[float]]:
    """One greedy request through a one-row scheduler, the loop serving runs, generating exactly
    `new_tokens` (no end-of-sequence stop, so every run times the same work). Returns the tokens,
    the time to the first token and the time between each token and the next, as a client of the
    engine sees them (detokenizing included; tokens kept from one verified draft arrive together).
    `options`: the scheduler's; `drafts` gathers its speculative decoding's counts."""
    scheduler = Scheduler(lm, tokenizer, set(), 1, **options)
    sent: list[float] = []
    start = clock()
    row = scheduler.admit(GenerationRequest(tuple(int(t) for t in prompt_ids), new_tokens), lambda delta, finish: sent.append(clock()))
    while scheduler.active:
        scheduler.step()
    if drafts is not None:
        drafts.merge(scheduler.draft_stats)
    return row.seq.ids, sent[0] - start, [b - a for a, b in zip(sent, sent[1:])]
