"""Kiln's decode engine: request state and checks (`request`), sampling (`sampler`), the in-flight
scheduler with chunked prefill (`scheduler`) and the prefix cache (`prefix_cache`), over any
`CausalLM` of `pipeline/modeling/runtime.py`.

Needs only numpy and a `tokenizers.Tokenizer`, and its modules import each other relatively: the
Triton package and the MLflow model carry this folder unchanged as the package `kiln_engine`
(beside `kiln_runtime.py`), so the server runs exactly the code Kiln's tests check. The Triton
model, the MLflow pyfunc model, validate's latency and the benchmarks all drive it.
"""

from .prefix_cache import BLOCK_TOKENS, PrefixCache, PrefixStats
from .request import GenerationRequest, Limits, RequestError, Sequence, advance, completion_tokens, parse_request, prompt_char_limit
from .sampler import sample
from .scheduler import Row, Scheduler, chunk_size, generate

__all__ = ["BLOCK_TOKENS", "GenerationRequest", "Limits", "PrefixCache", "PrefixStats", "RequestError", "Row", "Scheduler",
           "Sequence", "advance", "chunk_size", "completion_tokens", "generate", "parse_request", "prompt_char_limit", "sample"]
