"""Perplexity bookkeeping for the peers' scripts (numpy only: each runs in its own environment)."""

from __future__ import annotations

import math

import numpy as np


class WindowScores:
    """Negative log-likelihood and greedy predictions over token windows, from each window's logits."""

    def __init__(self) -> None:
        self.nll, self.count, self.predictions = 0.0, 0, []

    def add(self, logits, window: list[int]) -> None:
        """`logits` [len(window) - 1 or more, vocab]: position i predicts window[i + 1]."""
        logits = np.asarray(logits[: len(window) - 1], dtype=np.float64)
        shifted = logits - logits.max(axis=-1, keepdims=True)
        logp = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
        targets = np.asarray(window[1:])
        self.nll -= float(logp[np.arange(len(targets)), targets].sum())
        self.count += len(targets)
        self.predictions += logits.argmax(axis=-1).tolist()

    def result(self) -> dict:
        return {"ppl": math.exp(self.nll / self.count), "tokens": self.count, "predictions": self.predictions}
