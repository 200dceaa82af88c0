"""MLflow pyfunc model that runs a Kiln engine (MLflow's "models from code": this file is the model's
code, saved with each registered version; `pipeline/registry/mlflow_model.py` writes the model).

Loaded by `mlflow.pyfunc.load_model` and `mlflow models serve`, without Kiln installed: it needs
numpy, pandas, onnxruntime and tokenizers, plus `kiln_runtime`, `kiln_engine` and
`kiln_manifest`, which the model carries as code paths. Before the engine loads, every file of it
is checked against its sha256 manifest and that manifest against the digest recorded at
registration (in the model config); a mismatch stops the load.

Input: a `prompt` column (one row per prompt). Parameters (the signature's params):
max_tokens, temperature, top_k, top_p, seed, stop, speculative. Output: one row per prompt with `text`,
`finish_reason` ("eos" | "stop" | "length"), `prompt_tokens` and `completion_tokens`.
"""

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

PARAMS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "speculative")


class KilnEngineModel(PythonModel):
    def load_context(self, context):
        import kiln_engine
        import kiln_manifest
        import kiln_runtime
        from tokenizers import Tokenizer

        config = context.model_config
        engine_dir = Path(context.artifacts["engine"])
        kiln_manifest.check_folder(engine_dir, config["engine_digest"])
        self.lm = kiln_runtime.load_engine(engine_dir, config["session_options"])
        self.tokenizer = Tokenizer.from_file(str(engine_dir / "tokenizer.json"))
        self.eos_ids = set(config["eos_token_ids"])
        self.limits = kiln_engine.Limits(**config["limits"])
        self.max_batch = int(config["max_batch"])
        self.scheduler = dict(config.get("scheduler", {}))
        if config.get("draft_dir"):  # a draft model (package.speculative method draft), in the Triton package's files
            draft_dir = Path(context.artifacts["triton"]) / config["draft_dir"]
            kiln_manifest.check_folder(draft_dir, self.scheduler["speculative"]["draft_digest"])
            self.scheduler["draft_lm"] = kiln_runtime.load_draft_engine(self.scheduler["speculative"], draft_dir.parent)

    # `pd.DataFrame`: MLflow validates the input against the model's explicit signature (a type hint
    # it could infer a schema from would replace it; no hint at all draws a warning on every load)
    def predict(self, context, model_input: pd.DataFrame, params=None):
        import kiln_engine

        prompts = [str(p) for p in (model_input["prompt"] if hasattr(model_input, "columns") else model_input)]
        settings = {k: v for k, v in (params or {}).items() if k in PARAMS and v is not None}
        if settings.get("seed", -1) < 0:
            settings.pop("seed", None)  # the signature's default -1: no fixed seed
        if isinstance(settings.get("stop"), str):
            settings["stop"] = [settings["stop"]] if settings["stop"] else []
        try:
            requests = [kiln_engine.parse_request(p, settings, self.tokenizer, self.limits) for p in prompts]
        except kiln_engine.RequestError as e:  # the scoring server answers 400 with the reason
            from mlflow.exceptions import INVALID_PARAMETER_VALUE, MlflowException

            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from None
        texts, finish, sampled = [""] * len(requests), [None] * len(requests), [0] * len(requests)

        def emit(i, delta, finish_reason):  # called once per sampled token
            texts[i] += delta
            sampled[i] += 1
            if finish_reason is not None:
                finish[i] = finish_reason

        # one in-flight batch of max_batch rows; the next prompt takes a row as soon as one is free
        kiln_engine.generate(self.lm, requests, self.tokenizer, self.eos_ids, emit, slots=self.max_batch, **self.scheduler)
        return pd.DataFrame({
            "text": texts,
            "finish_reason": finish,
            "prompt_tokens": [len(r.prompt_ids) for r in requests],
            "completion_tokens": [kiln_engine.completion_tokens(n, f) for n, f in zip(sampled, finish)],
        })


mlflow.models.set_model(KilnEngineModel())
