"""Drafts for speculative decoding: tokens a row will probably generate next, checked by the target
engine in one forward (`Scheduler`), so several tokens can come out of one step.

`PromptLookup` drafts without a second model (prompt lookup / n-gram drafting, as transformers'
`prompt_lookup_num_tokens`, vLLM's and llama.cpp's n-gram drafters): the last n tokens of the row's
text (prompt and generated so far) are looked up earlier in that text, and the tokens that followed
their most recent earlier occurrence are the draft. Input-grounded generation (summarising,
extracting, rewriting, editing code) copies long spans, which is where it pays.

`DraftModel` drafts with a second, smaller engine of the same vocabulary (transformers'
`assistant_model`, llama.cpp's `--model-draft`, OpenVINO GenAI's draft model): it decodes k tokens
greedily after the row's text, in its own KV row, which keeps what was accepted and is rolled back
like the target's. Drafts are greedy, so the target keeps a drafted token exactly when it samples
that token itself: greedy output is the target's, and sampled output keeps the target's
distribution (the acceptance test that also works for drafts without probabilities, as for n-grams).

A draft's length adapts per row: it grows while whole drafts are accepted and shrinks when they are
not, and a row whose drafts keep failing stops drafting for a while, so open-ended text pays for
few rejected verifications (each costs more than a one-token step: benchmarks/verify_cost.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class DraftStats:
    """What a row's (or a scheduler's) drafts achieved: verifications, drafted and accepted tokens,
    and acceptance per draft position (accepted[i]: drafts whose position i was accepted)."""

    verifications: int = 0
    drafted: int = 0
    accepted: int = 0
    drafted_at: list[int] = field(default_factory=list)
    accepted_at: list[int] = field(default_factory=list)

    def add(self, drafted: int, accepted: int) -> None:
        self.verifications += 1
        self.drafted += drafted
        self.accepted += accepted
        for counts, upto in ((self.drafted_at, drafted), (self.accepted_at, accepted)):
            counts.extend([0] * (upto - len(counts)))
            for i in range(upto):
                counts[i] += 1

    def merge(self, other: "DraftStats") -> None:
        self.verifications += other.verifications
        self.drafted += other.drafted
        self.accepted += other.accepted
        for mine, theirs in ((self.drafted_at, other.drafted_at), (self.accepted_at, other.accepted_at)):
            mine.extend([0] * (len(theirs) - len(mine)))
            for i, n in enumerate(theirs):
                mine[i] += n

    @property
    def mean_accepted(self) -> float:
        """Accepted drafted tokens per verification (each verification also yields one token of its own)."""
        return self.accepted / self.verifications if self.verifications else 0.0

    def as_dict(self) -> dict:
        return {"verifications": self.verifications, "drafted_tokens": self.drafted, "accepted_tokens": self.accepted,
                "mean_accepted_length": round(self.mean_accepted, 3),
                "acceptance_by_position": [round(a / d, 3) for a, d in zip(self.accepted_at, self.drafted_at) if d]}


@dataclass
class AdaptiveDrafter:
    """What every drafter shares: the draft length, adapted after each verification, and the pause
    after repeated full rejections. Subclasses implement `draft(tokens, limit)`."""

    max_draft: int = 8
    draft_length: int = 4  # the current length, adapted after each verification
    failures: int = 0  # consecutive verifications with nothing accepted
    paused: int = 0  # steps left without drafting
    stats: DraftStats = field(default_factory=DraftStats)

    PAUSE_AFTER = 3  # consecutive fully rejected drafts before a pause
    PAUSE_STEPS = 16

    def propose(self, tokens: np.ndarray, room: int) -> list[int]:
        """A draft to follow `tokens` (the row's whole text; its last token is the step's input), at
        most `room` tokens (what the row may still generate and its KV buffer still hold, less the
        token the verification adds itself). Empty: decode one token as usual."""
        if self.paused:
            self.paused -= 1
            return []
        limit = min(self.draft_length, room)
        return self.draft(tokens, limit) if limit > 0 else []

    def draft(self, tokens: np.ndarray, limit: int) -> list[int]:
        raise NotImplementedError

    def update(self, drafted: int, accepted: int) -> None:
        """After a verification: grow the draft when all of it was accepted, shrink it when not,
        pause after repeated full rejections."""
        self.stats.add(drafted, accepted)
        if accepted == drafted:
            self.draft_length = min(self.max_draft, self.draft_length + 2)
            self.failures = 0
        else:
            self.draft_length = max(1, min(self.draft_length, accepted + 1))
            self.failures = self.failures + 1 if accepted == 0 else 0
            if self.failures >= self.PAUSE_AFTER:
                self.paused, self.failures = self.PAUSE_STEPS, 0


@dataclass
class PromptLookup(AdaptiveDrafter):
    """Prompt lookup drafting for one row. `max_ngram`/`min_ngram`: the suffix lengths looked up,
    longest first."""

    max_ngram: int = 3
    min_ngram: int = 1

    def draft(self, tokens: np.ndarray, limit: int) -> list[int]:
        length = len(tokens)
        for n in range(min(self.max_ngram, length - 1), self.min_ngram - 1, -1):
            # starts of earlier occurrences of the last n tokens (not the suffix itself)
            match = np.ones(length - n, dtype=bool)
            for i in range(n):
                match &= tokens[i:length - n + i] == tokens[length - n + i]
            starts = np.flatnonzero(match)
            if len(starts):
                start = int(starts[-1]) + n  # the most recent occurrence: its continuation is the draft
                return [int(t) for t in tokens[start:start + limit]]
        return []


@dataclass
class DraftModel(AdaptiveDrafter):
    """Drafts from a second engine (`lm`, a fused-graph `CausalLM` with row views) in `state`, one
    KV row of its own. Its row holds a prefix of the target row's text: each draft first feeds what
    it has not seen (the prompt on the first draft, tokens decoded while drafting paused or while
    other rows were decoding), then decodes greedily; after the verification its length is cut
    back to the accepted tokens, so a rejected draft's keys and values are overwritten next time."""

    lm: Any = None
    state: Any = None
    _base: int = 0  # the row's text length when the last draft was made

    def draft(self, tokens: np.ndarray, limit: int) -> list[int]:
        limit = min(limit, self.lm.max_sequence_length + 1 - len(tokens))  # its own context may be shorter
        if limit <= 0:
            return []
        seen = int(self.state.cache["row_lengths"][0])
        logits, self.state = self.lm.forward(np.asarray([tokens[seen:]], dtype=np.int64), self.state, last_only=True)
        draft = [int(np.argmax(logits[0, -1]))]
        while len(draft) < limit:
            logits, self.state = self.lm.forward(np.asarray([[draft[-1]]], dtype=np.int64), self.state, kernel="decode")
            draft.append(int(np.argmax(logits[0, -1])))
        self._base = len(tokens)
        return draft

    def update(self, drafted: int, accepted: int) -> None:
        super().update(drafted, accepted)
        # its row holds the text and draft[:-1]; of those, the accepted drafts stay valid
        self.state.cache["row_lengths"][0] = self._base + min(accepted, drafted - 1)
