"""Triton Python-backend model that serves a Kiln engine (copied into the repository as `model.py`).

Runs in the serving environment (numpy < 2, onnxruntime, tokenizers; no Kiln, no torch). Decoupled:
every request gets its responses through its own sender, one per text delta when `stream` is true,
else one with the whole text. Requests that arrive while a batch is running wait for the next one;
those that arrive together are decoded as one batch (`kiln_generation.generate`).

Before loading, every file of this model version is checked against `manifest.json` (sha256); a
changed or missing file stops the load with a log line, so the model never becomes ready.
"""

import json
import queue
import sys
import threading
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import kiln_generation  # noqa: E402  (copied beside this file by Kiln's package stage)
import kiln_manifest  # noqa: E402
import kiln_runtime  # noqa: E402

PARAMS = {"max_tokens": int, "temperature": float, "top_k": int, "top_p": float, "seed": int}


def scalar(request, name):
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy().reshape(-1)


def text_of(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class TritonPythonModel:
    def initialize(self, args):
        version_dir = Path(args["model_repository"]) / args["model_version"]
        try:
            kiln_manifest.check_folder(version_dir)
        except kiln_manifest.ManifestMismatch as e:
            pb_utils.Logger.log_error(str(e))
            raise
        from tokenizers import Tokenizer

        serving = json.loads((version_dir / "serving.json").read_text())
        engine_dir = version_dir / "engine"
        self.lm = kiln_runtime.load_ort_engine(engine_dir, serving["session_options"])
        self.tokenizer = Tokenizer.from_file(str(engine_dir / "tokenizer.json"))
        self.eos_ids = set(serving["eos_token_ids"])
        self.limits = kiln_generation.Limits(**serving["limits"])
        self.max_batch = serving["max_batch"]
        self.pending = queue.Queue()
        self.worker = threading.Thread(target=self.run_batches, daemon=True)
        self.worker.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                text = text_of(scalar(request, "text_input")[0])
                params = {k: cast(v[0]) for k, cast in PARAMS.items() if (v := scalar(request, k)) is not None}
                stop = scalar(request, "stop")
                params["stop"] = [text_of(s) for s in stop] if stop is not None else []
                stream = scalar(request, "stream")
                parsed = kiln_generation.parse_request(text, params, self.tokenizer, self.limits)
            except (kiln_generation.RequestError, ValueError, TypeError) as e:
                sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(str(e))),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            self.pending.put((sender, parsed, bool(stream[0]) if stream is not None else False))
        return None

    def run_batches(self):
        while True:
            first = self.pending.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self.pending.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self.pending.put(None)
                    break
                batch.append(item)
            self.serve(batch)

    def serve(self, batch):
        texts = [""] * len(batch)

        def emit(row, delta, finish_reason):
            sender, _, stream = batch[row]
            texts[row] += delta
            if stream and delta:
                sender.send(self.response(delta))
            if finish_reason is not None:
                if stream:
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                else:
                    sender.send(self.response(texts[row]), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

        try:
            kiln_generation.generate(self.lm, [req for _, req, _ in batch], self.tokenizer, self.eos_ids, emit)
        except Exception as e:  # the server keeps serving; every open request gets the error
            pb_utils.Logger.log_error(f"kiln: generation failed: {e!r}")
            for sender, _, _ in batch:
                try:
                    sender.send(pb_utils.InferenceResponse(output_tensors=[], error=pb_utils.TritonError(f"generation failed: {e}")),
                                flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                except Exception:
                    pass  # already completed

    @staticmethod
    def response(text):
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=object))])

    def finalize(self):
        self.pending.put(None)
        self.worker.join(timeout=30)
