"""Kiln's decode engine: request state and checks (`request`), sampling (`sampler`), the in-flight
scheduler with chunked prefill and speculative decoding (`scheduler`), drafters (`drafter`), the
prefix cache (`prefix_cache`) and the priority waiting room (`waiting`), over any `CausalLM` of
`pipeline/modeling/runtime.py`.

Needs only numpy and a `tokenizers.Tokenizer`, and its modules import each other relatively: the
Triton package and the MLflow model carry this folder unchanged as the package `kiln_engine`
(beside `kiln_runtime.py`), so the server runs exactly the code Kiln's tests check. The Triton
model, the MLflow pyfunc model, validate's latency and the benchmarks all drive it.
"""

from .drafter import AdaptiveDrafter, DraftModel, DraftStats, PromptLookup
from .prefix_cache import BLOCK_TOKENS, PrefixCache, PrefixStats
from .request import GenerationRequest, Limits, RequestError, Sequence, advance, completion_tokens, parse_request, prompt_char_limit
from .sampler import sample
from .scheduler import Row, Scheduler, chunk_size, generate, timed_greedy
from .waiting import CLASSES as PRIORITY_CLASSES
from .waiting import DEFAULT_RANK, WaitingRoom, class_rank

__all__ = ["BLOCK_TOKENS", "DEFAULT_RANK", "PRIORITY_CLASSES", "AdaptiveDrafter", "DraftModel", "DraftStats", "GenerationRequest", "Limits", "PrefixCache", "PrefixStats",
           "PromptLookup", "RequestError", "Row", "Scheduler", "Sequence", "WaitingRoom", "advance", "class_rank", "chunk_size", "completion_tokens", "generate", "parse_request",
           "prompt_char_limit", "sample", "timed_greedy"]
