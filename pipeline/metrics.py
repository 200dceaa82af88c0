"""Each metric computed in exactly one place: perplexity, next-token agreement, latency summary."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


def log_softmax(logits: np.ndarray) -> np.ndarray:
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under logits [n, vocab]."""
    return -log_softmax(logits)[np.arange(len(targets)), targets]


def perplexity(nll_sum: float, count: int) -> float:
    return math.exp(nll_sum / count)


def agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions where two models' greedy next tokens are the same."""
    return float(np.mean(np.asarray(a) == np.asarray(b)))


def eval_windows(ids: list[int], window: int) -> list[np.ndarray]:
    """Non-overlapping windows of `window` tokens (a shorter tail is kept if it predicts anything)."""
    chunks = [np.asarray(ids[i : i + window], dtype=np.int64) for i in range(0, len(ids), window)]
    return [c for c in chunks if len(c) >= 2]


@dataclass(frozen=True)
class LatencySummary:
    ttft_ms: float
    decode_p50_ms: float
    decode_p95_ms: float
    tokens_per_s: float  # decode throughput: decoded tokens / decode time (prefill excluded)

    @classmethod
    def from_runs(cls, ttfts: list[float], steps: list[list[float]]) -> "LatencySummary":
        pooled = np.asarray([s for run in steps for s in run])
        per_run_tps = [len(run) / sum(run) for run in steps if run and sum(run) > 0]
        return cls(
            ttft_ms=float(np.median(ttfts) * 1e3),
            decode_p50_ms=float(np.percentile(pooled, 50) * 1e3),
            decode_p95_ms=float(np.percentile(pooled, 95) * 1e3),
            tokens_per_s=float(np.median(per_run_tps)),
        )
