"""The inputs of one streaming generation request to Kiln's Triton model over Triton's gRPC API
(names and types as `stages/package.INPUTS` declares them). Needs tritonclient, which only the
tests and benchmarks install; the serving side never imports this."""

from __future__ import annotations

import numpy as np


def streaming_request(prompt: str, max_tokens: int) -> list:
    import tritonclient.grpc as grpcclient

    inputs = [grpcclient.InferInput("text_input", [1], "BYTES"), grpcclient.InferInput("max_tokens", [1], "INT32"),
              grpcclient.InferInput("stream", [1], "BOOL")]
    inputs[0].set_data_from_numpy(np.array([prompt.encode()], dtype=object))
    inputs[1].set_data_from_numpy(np.array([max_tokens], dtype=np.int32))
    inputs[2].set_data_from_numpy(np.array([True]))
    return inputs
