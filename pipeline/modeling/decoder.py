"""One description of a decoder-only transformer, and the table of families that fill it.

Every graph Kiln writes (the portable opset-21 export, the fused ONNX Runtime graph, the copy
TensorRT parses), the quantizer's layer list and `kiln check`'s group-size check read a
`DecoderSpec`; nothing else reads a model's layout from `config.json` (the source stage reads only
`architectures` and `auto_map` from it, to refuse or report before describing). The spec is
filled from transformers' own config class for the checkpoint's `model_type` (so its defaults and
derived fields, such as Qwen2's `layer_types` or Gemma 3's per-layer rope parameters, are
transformers' own), by the family's row in `ARCHITECTURES`.

Adding a family is a row: which HF names its norms carry and where they sit, what its config says
about multipliers, soft-capping, windows and fused projections, and a tiny config that switches
its features on for the parity tests. The graph writers are not edited.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal

from pipeline.errors import KilnError

FULL, SLIDING = "full_attention", "sliding_attention"
# The config keys every family's description needs; a config without one is refused naming it.
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


class UnsupportedModel(KilnError):
    """A checkpoint Kiln cannot describe: unknown architecture, missing config key, unreadable config."""

    exit_code = 2


@dataclass(frozen=True)
class NormNames:
    """HF weight-name suffixes (inside `model.layers.<i>.`) of the norms around the two sublayers; None
    where the family has none. Llama: pre-norms only; Gemma 2/3: pre and post; OLMo 2: post only."""

    attn_in: str | None = "input_layernorm"
    attn_out: str | None = None
    mlp_in: str | None = "post_attention_layernorm"
    mlp_out: str | None = None


@dataclass(frozen=True)
class DecoderSpec:
    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    # dimensions of each head that rotary rotates (the first ones; partial rotary keeps the rest)
    rotary_dim: int
    # per layer: FULL or SLIDING, and which rotary table it reads ("default", or a layer type for
    # families with a rope per layer type, such as Gemma 3)
    layer_kinds: tuple[str, ...]
    layer_rope: tuple[str, ...]
    # HF semantics: a sliding layer's query at position q sees keys k with q - window < k <= q
    sliding_window: int | None
    norm_eps: float
    # RMSNorm multiplies by (offset + w): 1.0 for Gemma's (1 + w) norms
    norm_offset: float = 0.0
    norms: NormNames = NormNames()
    # "head": RMSNorm over each head's dims (Qwen3, Gemma 3); "full": over the whole projection (OLMo 2)
    qk_norm: Literal["none", "head", "full"] = "none"
    activation: Literal["silu", "gelu_tanh"] = "silu"
    attention_scale: float = 0.0  # 0: head_dim ** -0.5
    attention_softcap: float | None = None
    final_softcap: float | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    logit_divisor: float = 1.0
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    # HF keeps q/k/v (gate/up) in one Linear: `self_attn.qkv_proj`, `mlp.gate_up_proj`
    fused_qkv: bool = False
    fused_gate_up: bool = False
    rope_type: str = "default"
    # positions up to which the rotary tables are exact (longrope and dynamic NTK change with length)
    max_exact_positions: int | None = None

    @property
    def scale(self) -> float:
        return self.attention_scale or self.head_dim ** -0.5

    @property
    def reference_attention(self) -> str | None:
        """transformers' attention implementation that computes this model as designed: its sdpa path
        drops attention soft-capping (measured on Gemma 2: logits off by 2.4), its eager path keeps it."""
        return "eager" if self.attention_softcap else None

    def window(self, layer: int) -> int | None:
        return self.sliding_window if self.layer_kinds[layer] == SLIDING else None

    def projection(self, layer: int, name: str) -> tuple[str, tuple[int, int] | None]:
        """Where the logical projection `name` (q, k, v, o, gate, up, down) of a layer lives in the HF
        checkpoint: its module and, for a fused module, the rows (output features) that are its own."""
        p = f"model.layers.{layer}"
        H, KV, inter = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim, self.intermediate_size
        if name in ("q", "k", "v") and self.fused_qkv:
            rows = {"q": (0, H), "k": (H, H + KV), "v": (H + KV, H + 2 * KV)}[name]
            return f"{p}.self_attn.qkv_proj", rows
        if name in ("gate", "up") and self.fused_gate_up:
            return f"{p}.mlp.gate_up_proj", (0, inter) if name == "gate" else (inter, 2 * inter)
        module = "self_attn" if name in ("q", "k", "v", "o") else "mlp"
        return f"{p}.{module}.{name}_proj", None

    def linear_name(self, layer: int, name: str) -> str:
        """The logical name of a projection in Kiln's graphs (fused HF modules appear split)."""
        module = "self_attn" if name in ("q", "k", "v", "o") else "mlp"
        return f"model.layers.{layer}.{module}.{name}_proj"

    def quantizable_layers(self, layer: int = 0) -> dict[str, int]:
        """HF Linear module -> in_features, for one decoder layer and the head: what the quantizer
        sees (fused modules whole) and what the group-size check tests."""
        attn_in = self.num_heads * self.head_dim
        out: dict[str, int] = {}
        for name in ("q", "k", "v", "o", "gate", "up", "down"):
            module, _ = self.projection(layer, name)
            out[module] = {"o": attn_in, "down": self.intermediate_size}.get(name, self.hidden_size)
        out["lm_head"] = self.hidden_size
        return out

    def norm_weight(self, layer: int, which: str) -> str | None:
        """HF weight name of a layer's norm (attn_in, attn_out, mlp_in, mlp_out, q, k), or None."""
        if which in ("q", "k"):
            return None if self.qk_norm == "none" else f"model.layers.{layer}.self_attn.{which}_norm.weight"
        suffix = getattr(self.norms, which)
        return None if suffix is None else f"model.layers.{layer}.{suffix}.weight"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DecoderSpec":
        d = dict(d)
        d["norms"] = NormNames(**d["norms"])
        d["layer_kinds"], d["layer_rope"] = tuple(d["layer_kinds"]), tuple(d["layer_rope"])
        return cls(**d)


# --------------------------------------------------------------------------- the family table


@dataclass(frozen=True)
class Family:
    """One row: `describe(hf_config)` returns the fields that differ from the common reading; `tiny` is a transformers config (kwargs) that switches the family's features on, for
    random test models."""

    name: str
    describe: Callable[[Any], dict[str, Any]]
    tiny: dict[str, Any]
    # what the family has that the tests must exercise, in words (docs/results.md table)
    features: str


def _sliding_everywhere(c) -> dict[str, Any]:
    """Mistral, Phi-3: one `sliding_window` for every layer (none when null)."""
    window = getattr(c, "sliding_window", None)
    return {"layer_kinds": (SLIDING if window else FULL,) * c.num_hidden_layers}


def _llama(c) -> dict[str, Any]:
    return {"qkv_bias": bool(getattr(c, "attention_bias", False)), "o_bias": bool(getattr(c, "attention_bias", False)),
            "mlp_bias": bool(getattr(c, "mlp_bias", False))}


def _qwen2(c) -> dict[str, Any]:
    return {"qkv_bias": True}


def _qwen3(c) -> dict[str, Any]:
    return {"qk_norm": "head", **_llama(c)}


def _phi3(c) -> dict[str, Any]:
    return {"fused_qkv": True, "fused_gate_up": True, **_sliding_everywhere(c)}


def _gemma_common(c) -> dict[str, Any]:
    return {"norm_offset": 1.0, "activation": _activation(c.hidden_activation),
            "norms": NormNames("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm"),
            "attention_scale": c.query_pre_attn_scalar ** -0.5, "embedding_multiplier": c.hidden_size ** 0.5,
            "final_softcap": c.final_logit_softcapping, "qkv_bias": bool(c.attention_bias), "o_bias": bool(c.attention_bias)}


def _gemma2(c) -> dict[str, Any]:
    return {**_gemma_common(c), "attention_softcap": c.attn_logit_softcapping}


def _gemma3(c) -> dict[str, Any]:
    if getattr(c, "use_bidirectional_attention", False):
        raise UnsupportedModel("Gemma 3 with use_bidirectional_attention (an encoder) is not a causal LM Kiln builds")
    # transformers' Gemma3Attention keeps `attn_logit_softcapping` but never applies it: neither does Kiln.
    return {**_gemma_common(c), "qk_norm": "head", "layer_rope": tuple(c.layer_types)}


def _granite(c) -> dict[str, Any]:
    return {**_llama(c), "attention_scale": c.attention_multiplier, "embedding_multiplier": c.embedding_multiplier,
            "residual_multiplier": c.residual_multiplier, "logit_divisor": float(c.logits_scaling)}


def _olmo2(c) -> dict[str, Any]:
    return {**_llama(c), "qk_norm": "full",
            "norms": NormNames(None, "post_attention_layernorm", None, "post_feedforward_layernorm")}


def _activation(hf_name: str) -> str:
    names = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
    if hf_name not in names:
        raise UnsupportedModel(f"activation {hf_name!r} is not one Kiln's graphs write; supported: {', '.join(sorted(names))}")
    return names[hf_name]


TINY = {"vocab_size": 264, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "max_position_embeddings": 1024,
        "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256}

ARCHITECTURES: dict[str, Family] = {
    "LlamaForCausalLM": Family("llama", _llama, {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                                 "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                                 "original_max_position_embeddings": 256}},
                               "pre-norm RMSNorm, SiLU MLP, GQA, llama3 rope scaling"),
    "MistralForCausalLM": Family("mistral", _sliding_everywhere, {"sliding_window": 8}, "sliding window on every layer"),
    "Qwen2ForCausalLM": Family("qwen2", _qwen2, {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1},
                               "q/k/v bias, sliding window from layer max_window_layers on"),
    "Qwen3ForCausalLM": Family("qwen3", _qwen3, {}, "q/k RMSNorm per head"),
    # head_dim 32 with half of it rotated: ONNX Runtime's GroupQueryAttention needs rotary_dim / 2 a multiple of 8
    "Phi3ForCausalLM": Family("phi3", _phi3, {"num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
                                              "partial_rotary_factor": 0.5, "sliding_window": 8, "original_max_position_embeddings": 256,
                                              "rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                                                  "partial_rotary_factor": 0.5,
                                                                  "short_factor": [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7],
                                                                  "long_factor": [2.0] * 8, "original_max_position_embeddings": 256}},
                              "fused qkv_proj and gate_up_proj, partial rotary, longrope"),
    "Gemma2ForCausalLM": Family("gemma2", _gemma2, {"sliding_window": 8, "query_pre_attn_scalar": 24, "attn_logit_softcapping": 5.0,
                                                    "final_logit_softcapping": 3.0},
                                "(1+w) norms before and after each sublayer, √hidden embedding scale, GELU-tanh, attention and logit "
                                "soft-capping, alternating sliding/global layers"),
    "Gemma3ForCausalLM": Family("gemma3", _gemma3, {"sliding_window": 8, "query_pre_attn_scalar": 24, "sliding_window_pattern": 2,
                                                    "final_logit_softcapping": 3.0,
                                                    "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                                           "rope_theta": 1000000.0},
                                                                        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}},
                                "Gemma 2's norms plus q/k norms, local and global layers with their own rope"),
    "GraniteForCausalLM": Family("granite", _granite, {"embedding_multiplier": 12.0, "residual_multiplier": 0.22,
                                                       "attention_multiplier": 0.0156, "logits_scaling": 8.0},
                                 "embedding, residual, attention and logit multipliers"),
    "Olmo2ForCausalLM": Family("olmo2", _olmo2, {}, "norms after each sublayer only, q/k RMSNorm over the whole projection"),
}
FAMILIES = {f.name: arch for arch, f in ARCHITECTURES.items()}


def supported_list() -> str:
    return ", ".join(ARCHITECTURES)


def hf_config(raw: dict[str, Any], where: str = "config.json"):
    """transformers' config object for a raw config.json dict of a supported architecture."""
    architecture = architecture_of(raw, where)
    missing = [k for k in REQUIRED_KEYS if k not in raw]
    if missing:
        raise UnsupportedModel(f"{where}: {architecture} needs key {', '.join(repr(k) for k in missing)}, which the file does not have")
    from transformers import CONFIG_MAPPING

    model_type = raw.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise UnsupportedModel(f"{where}: model_type {model_type!r} is not known to the installed transformers")
    try:
        return CONFIG_MAPPING[model_type].from_dict(raw)
    except Exception as e:  # transformers validates rope and head layouts with many exception types
        raise UnsupportedModel(f"{where}: transformers rejects this config ({type(e).__name__}: {str(e)[:300]})") from None


def architecture_of(raw: Any, where: str) -> str:
    if not isinstance(raw, dict):
        raise UnsupportedModel(f"{where}: not a JSON object")
    archs = raw.get("architectures") or []
    supported = [a for a in archs if a in ARCHITECTURES] if isinstance(archs, list) else []
    if not supported:
        raise UnsupportedModel(f"{where}: architecture {archs or '(none given)'} is not supported by Kiln; supported: {supported_list()}")
    return supported[0]


def describe(config, architecture: str | None = None) -> DecoderSpec:
    """The spec of a transformers config object (any supported family)."""
    architecture = architecture or next(a for a in (config.architectures or []) if a in ARCHITECTURES)
    try:
        return _describe(config, architecture)
    except (AttributeError, KeyError, TypeError) as e:  # a config of another shape than the family's (e.g. multimodal)
        raise UnsupportedModel(f"{architecture}: the config does not read as this family's ({type(e).__name__}: {e})") from None


def _describe(config, architecture: str) -> DecoderSpec:
    c = config
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    rope = _rope_parameters(c)
    first = next(iter(rope.values()))
    partial = float(first.get("partial_rotary_factor", getattr(c, "partial_rotary_factor", None) or 1.0))
    layer_kinds = tuple(getattr(c, "layer_types", None) or (FULL,) * c.num_hidden_layers)
    window = getattr(c, "sliding_window", None)
    spec = DecoderSpec(
        architecture=architecture, model_type=c.model_type, vocab_size=c.vocab_size, hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size, num_layers=c.num_hidden_layers, num_heads=heads,
        num_kv_heads=getattr(c, "num_key_value_heads", None) or heads, head_dim=head_dim,
        rotary_dim=int(head_dim * partial), layer_kinds=layer_kinds, layer_rope=("default",) * c.num_hidden_layers,
        sliding_window=window, norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)),
        activation=_activation(getattr(c, "hidden_act", "silu")),
        tie_word_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        rope_type=str(first.get("rope_type", "default")),
        max_exact_positions=_max_exact_positions(c, first),
    )
    spec = replace(spec, **ARCHITECTURES[architecture].describe(c))
    if SLIDING not in spec.layer_kinds:
        spec = replace(spec, sliding_window=None)
    elif not spec.sliding_window:
        raise UnsupportedModel(f"{architecture}: layers are marked sliding_attention but sliding_window is {window!r}")
    return spec


def _rope_parameters(c) -> dict[str, dict[str, Any]]:
    """Rope parameters per rotary table key ("default", or per layer type)."""
    params = getattr(c, "rope_parameters", None) or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return params
    return {"default": params}


def _max_exact_positions(c, rope: dict[str, Any]) -> int | None:
    """longrope switches to its long factors, and dynamic NTK rescales, once a sequence passes the
    original context; below that both equal their static tables, which is what Kiln's graphs hold."""
    kind = rope.get("rope_type", "default")
    if kind == "longrope":
        return int(rope.get("original_max_position_embeddings") or getattr(c, "original_max_position_embeddings", None)
                   or c.max_position_embeddings)
    if kind == "dynamic":
        return int(c.max_position_embeddings)
    return None


def spec_from_folder(folder: Path) -> DecoderSpec:
    path = folder / "config.json"
    return describe(hf_config(read_json(path), str(path)))


def read_json(path: Path) -> Any:
    if not path.is_file():
        raise UnsupportedModel(f"{path} does not exist; is the folder a Hugging Face checkpoint?")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UnsupportedModel(f"{path} is not valid JSON ({type(e).__name__}: {str(e)[:200]})") from None


def spec_from_gguf(path: Path) -> DecoderSpec:
    """The spec from a GGUF file's metadata (no tensors read), as Kiln's GGUF reader maps llama.cpp's
    architecture and keys back to a transformers config (pipeline/modeling/gguf_checkpoint.py)."""
    from pipeline.modeling.gguf_checkpoint import GgufMetadata, gguf_config

    config = gguf_config(GgufMetadata(path))
    return describe(config, config.architectures[0])


def tiny_config(family: str, overrides: dict[str, Any]):
    """A transformers config for a tiny random model of `family` with its features switched on."""
    from transformers import AutoConfig

    if family not in FAMILIES:
        raise UnsupportedModel(f"family {family!r} is not supported; supported: {', '.join(FAMILIES)}")
    arch = FAMILIES[family]
    model_type = {"Gemma3ForCausalLM": "gemma3_text"}.get(arch, family)
    kwargs = {**TINY, **ARCHITECTURES[arch].tiny, **overrides, "architectures": [arch]}
    if "head_dim" not in overrides and {"hidden_size", "num_attention_heads"} & set(overrides):
        kwargs["head_dim"] = kwargs["hidden_size"] // kwargs["num_attention_heads"]
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except Exception as e:  # transformers validates rope and head layouts with many exception types
        raise UnsupportedModel(f"transformers rejects this {family} config ({type(e).__name__}: {str(e)[:300]})") from None


def rotary_tables(config, spec: DecoderSpec) -> dict[str, tuple[Any, float]]:
    """table key -> (inv_freq [rotary_dim/2] float32 numpy, attention scaling), computed by the
    family's own transformers rotary class, so every rope type it implements is computed its way."""
    import importlib

    import transformers

    model_class = getattr(transformers, spec.architecture)
    module = importlib.import_module(model_class.__module__)
    prefix = spec.architecture.removesuffix("ForCausalLM")
    rotary_class = getattr(module, f"{prefix}RotaryEmbedding")
    rotary = rotary_class(config=config)
    tables = {}
    for key in sorted(set(spec.layer_rope)):
        attr = "" if key == "default" else f"{key}_"
        inv_freq = getattr(rotary, f"{attr}inv_freq")
        scaling = getattr(rotary, f"{attr}attention_scaling", getattr(rotary, "attention_scaling", 1.0))
        tables[key] = (inv_freq.float().numpy(), float(scaling))
    if any(len(inv) * 2 != spec.rotary_dim for inv, _ in tables.values()):
        raise UnsupportedModel(f"{spec.architecture}: rotary tables do not cover rotary_dim {spec.rotary_dim}")
    return tables


def check_positions(spec: DecoderSpec, max_sequence_length: int) -> str | None:
    """The build error when the engine's context passes what its rotary tables hold exactly."""
    if spec.max_exact_positions is not None and max_sequence_length > spec.max_exact_positions:
        return (f"build.max_sequence_length: {max_sequence_length} exceeds {spec.max_exact_positions}, the length up to which "
                f"{spec.architecture}'s {spec.rope_type} rotary embedding is one fixed table (beyond it transformers switches "
                f"to other frequencies mid-sequence); allowed: up to {spec.max_exact_positions}")
    return None
