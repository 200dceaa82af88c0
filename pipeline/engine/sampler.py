"""Choosing the next token from a row's logits."""

from __future__ import annotations

import numpy as np

from .request import GenerationRequest


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
