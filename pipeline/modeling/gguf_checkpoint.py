"""GGUF files as llama.cpp writes them, read into an ordinary Hugging Face checkpoint.

Everything comes from the file: the architecture (`general.architecture`), the hyper-parameters
(`<arch>.*` keys), the tensors (llama.cpp's names mapped back through the gguf package's own table,
dequantized with its own kernels) and the tokenizer (`tokenizer.ggml.*`). What llama.cpp's converter
changed on the way in is undone here, one row per architecture: Llama-layout q/k rows permuted for
its rotary kernel, Gemma's RMSNorm weights stored with their `1 +` folded in, Gemma 3's sliding-window
pattern and attention scale that llama.cpp fixes in code rather than in the file.

transformers' own GGUF loader is not used for these: on files from llama.cpp's converter it loses
Qwen3's head_dim, and builds a Gemma tokenizer without the BOS token and with other ids than
llama.cpp's (tests/unit/test_gguf_llamacpp.py checks ours against llama.cpp's tokens and logits).
Nor for byte-level BPE ("gpt2") tokenizers: llama.cpp splits words with its own regexes per
pre-tokenizer, which differ from the tokenizer.json transformers rebuilds (on SmolLM2's file, a
blank line before a digit)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.modeling.decoder import UnsupportedModel

SPM_CONTROL, SPM_USER_DEFINED = 3, 4  # llama.cpp's token types (llama_token_type)


class GgufMetadata:
    """A GGUF file's key/value metadata and tensor directory (tensor data is memory-mapped, not read)."""

    def __init__(self, path: Path):
        from gguf import GGUFReader

        try:
            self.reader = GGUFReader(str(path))
        except Exception as e:  # truncated or foreign files raise IndexError/ValueError/struct errors
            raise UnsupportedModel(f"{path}: cannot read its GGUF metadata ({type(e).__name__}: {str(e)[:300]})") from None
        self.path = path
        self.fields = self.reader.fields
        self.arch = str(self.value("general.architecture", ""))
        self.tensors = {t.name: t for t in self.reader.tensors}

    def value(self, key: str, default: Any = None) -> Any:
        field_ = self.fields.get(key)
        return default if field_ is None else field_.contents()

    def hparam(self, key: str, default: Any = None) -> Any:
        """`<arch>.<key>`; a per-layer array (some families vary heads by layer) is refused."""
        value = self.value(f"{self.arch}.{key}", default)
        if isinstance(value, list):
            raise UnsupportedModel(f"{self.path}: {self.arch}.{key} varies by layer ({value[:4]}...); Kiln's decoder has one value")
        return value

    def tensor_values(self, name: str):
        """A tensor dequantized to float32 numpy, in transformers' [out, in] order (GGUF lists dims reversed)."""
        import numpy as np
        from gguf.quants import dequantize

        tensor = self.tensors[name]
        try:
            values = dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise UnsupportedModel(f"{self.path}: tensor {name} is {tensor.tensor_type.name}, which the gguf package "
                                   "cannot dequantize") from None
        return np.asarray(values, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])

    def required(self, key: str) -> Any:
        value = self.hparam(key)
        if value is None:
            raise UnsupportedModel(f"{self.path}: GGUF metadata lacks {self.arch}.{key}")
        return value


@dataclass(frozen=True)
class GgufArchitecture:
    """How one llama.cpp architecture maps back to a transformers model."""

    architecture: str  # the transformers class
    model_type: str
    permuted_qk: bool = False  # llama.cpp's converter permutes Llama-layout q/k rows (interleaved rotary)
    norm_shift: float = 0.0  # added to every `*norm.weight` by the converter (Gemma's `1 + w`)
    config: Callable[[GgufMetadata], dict[str, Any]] = field(default=lambda meta: {})


def rope(meta: GgufMetadata, theta_key: str = "rope.freq_base", default_theta: float = 10000.0) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_type": "default", "rope_theta": float(meta.hparam(theta_key, default_theta))}
    scaling = meta.hparam("rope.scaling.type")
    if scaling == "linear":
        params.update(rope_type="linear", factor=float(meta.required("rope.scaling.factor")))
    elif scaling not in (None, "none"):
        raise UnsupportedModel(f"{meta.path}: rope scaling {scaling!r} in a GGUF file is not read by Kiln; read: none, linear")
    return params


def attention_scale_dim(meta: GgufMetadata, layers_27b: int) -> int:
    """llama.cpp scales Gemma attention by 1/sqrt(head_dim), except on the 27B models (hidden/heads)."""
    hidden, heads = meta.required("embedding_length"), meta.required("attention.head_count")
    return hidden // heads if meta.required("block_count") == layers_27b else meta.hparam("attention.key_length", hidden // heads)


def gemma2_config(meta: GgufMetadata) -> dict[str, Any]:
    return {"attn_logit_softcapping": meta.hparam("attn_logit_softcapping"),
            "final_logit_softcapping": meta.hparam("final_logit_softcapping"),
            "sliding_window": meta.required("attention.sliding_window"),
            "query_pre_attn_scalar": attention_scale_dim(meta, 46), "rope_parameters": rope(meta)}


def gemma3_config(meta: GgufMetadata) -> dict[str, Any]:
    layers = meta.required("block_count")
    window = meta.hparam("attention.sliding_window")
    pattern = meta.value(f"{meta.arch}.attention.sliding_window_pattern")
    if window is None:  # no window in the file: every layer attends globally
        sliding = [False] * layers
    elif isinstance(pattern, list):  # newer files: one flag per layer
        sliding = [bool(p) for p in pattern]
    else:  # llama.cpp's default for gemma3 (src/models/gemma3.cpp): every 6th layer is global
        period = int(pattern or 6)
        sliding = [i % period < period - 1 for i in range(layers)]
    return {"sliding_window": window or 4096, "query_pre_attn_scalar": attention_scale_dim(meta, 62),
            "final_logit_softcapping": meta.hparam("final_logit_softcapping"), "attn_logit_softcapping": None,
            "layer_types": ["sliding_attention" if s else "full_attention" for s in sliding],
            "rope_parameters": {"full_attention": rope(meta, default_theta=1_000_000.0),
                                "sliding_attention": {"rope_type": "default",
                                                      "rope_theta": float(meta.hparam("rope.freq_base_swa", 10000.0))}}}


def phi3_config(meta: GgufMetadata) -> dict[str, Any]:
    """Partial rotary from rope.dimension_count; LongRoPE factors are tensors in the file. llama.cpp
    runs Phi-3 without a sliding window (src/models/phi3.cpp), so the checkpoint has none either."""
    head_dim = meta.required("embedding_length") // meta.required("attention.head_count")
    rotary = meta.hparam("rope.dimension_count", head_dim)
    params = {"rope_type": "default", "rope_theta": float(meta.hparam("rope.freq_base", 10000.0)),
              "partial_rotary_factor": rotary / head_dim}
    extra: dict[str, Any] = {}
    if "rope_factors_long.weight" in meta.tensors:
        original = int(meta.required("rope.scaling.original_context_length"))
        params.update(rope_type="longrope", original_max_position_embeddings=original,
                      long_factor=meta.tensor_values("rope_factors_long.weight").tolist(),
                      short_factor=meta.tensor_values("rope_factors_short.weight").tolist())
        if meta.hparam("rope.scaling.attn_factor") is not None:
            params["attention_factor"] = float(meta.hparam("rope.scaling.attn_factor"))
        extra["original_max_position_embeddings"] = original
    return {"rope_parameters": params, "partial_rotary_factor": rotary / head_dim, "sliding_window": None, **extra}


def granite_config(meta: GgufMetadata) -> dict[str, Any]:
    """Granite's four multipliers, which llama.cpp's converter renames to *_scale keys."""
    multipliers = {"embedding_multiplier": "embedding_scale", "residual_multiplier": "residual_scale",
                   "attention_multiplier": "attention.scale", "logits_scaling": "logit_scale"}
    return {"rope_parameters": rope(meta),
            **{hf: float(meta.hparam(key)) for hf, key in multipliers.items() if meta.hparam(key) is not None}}


GGUF_ARCHITECTURES = {
    "llama": GgufArchitecture("LlamaForCausalLM", "llama", permuted_qk=True, config=lambda m: {"rope_parameters": rope(m)}),
    "qwen2": GgufArchitecture("Qwen2ForCausalLM", "qwen2", config=lambda m: {"rope_parameters": rope(m, default_theta=1_000_000.0)}),
    "qwen3": GgufArchitecture("Qwen3ForCausalLM", "qwen3", config=lambda m: {"rope_parameters": rope(m, default_theta=1_000_000.0)}),
    "gemma2": GgufArchitecture("Gemma2ForCausalLM", "gemma2", norm_shift=1.0, config=gemma2_config),
    "gemma3": GgufArchitecture("Gemma3ForCausalLM", "gemma3_text", norm_shift=1.0, config=gemma3_config),
    "phi3": GgufArchitecture("Phi3ForCausalLM", "phi3", config=phi3_config),
    "granite": GgufArchitecture("GraniteForCausalLM", "granite", permuted_qk=True, config=granite_config),
    "olmo2": GgufArchitecture("Olmo2ForCausalLM", "olmo2", config=lambda m: {"rope_parameters": rope(m)}),
}
# What a GGUF file may hold that Kiln would silently get wrong: refused with the reason.
REFUSED_TENSORS = {"rope_freqs.weight": "per-dimension rope frequency factors (Llama 3.1-style long context)"}


def gguf_architecture(meta: GgufMetadata) -> GgufArchitecture:
    row = GGUF_ARCHITECTURES.get(meta.arch)
    if row is None:
        raise UnsupportedModel(f"{meta.path}: GGUF architecture {meta.arch!r} (written by llama.cpp) is not read by Kiln; "
                               f"read: {', '.join(GGUF_ARCHITECTURES)}")
    for name, what in REFUSED_TENSORS.items():
        if name in meta.tensors:
            raise UnsupportedModel(f"{meta.path}: holds {name} ({what}), which Kiln does not read")
    return row


def gguf_config(meta: GgufMetadata):
    """The transformers config the GGUF file describes."""
    from transformers import AutoConfig

    row = gguf_architecture(meta)
    if "token_embd.weight" not in meta.tensors:
        raise UnsupportedModel(f"{meta.path}: has no token_embd.weight tensor (a vocabulary-only GGUF file?)")
    heads, hidden = meta.required("attention.head_count"), meta.required("embedding_length")
    special = {f"{name}_token_id": meta.value(f"tokenizer.ggml.{gguf_name}_token_id")
               for name, gguf_name in (("bos", "bos"), ("eos", "eos"), ("pad", "padding"))}
    kwargs = {
        "hidden_size": hidden, "intermediate_size": meta.required("feed_forward_length"),
        "num_hidden_layers": meta.required("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta.hparam("attention.head_count_kv", heads),
        "head_dim": meta.hparam("attention.key_length", hidden // heads),
        "max_position_embeddings": meta.required("context_length"),
        "rms_norm_eps": float(meta.required("attention.layer_norm_rms_epsilon")),
        "vocab_size": int(meta.tensors["token_embd.weight"].shape[1]),
        "tie_word_embeddings": "output.weight" not in meta.tensors,
        **{k: v for k, v in special.items() if v is not None},
        **row.config(meta), "architectures": [row.architecture],
    }
    try:
        return AutoConfig.for_model(row.model_type, **kwargs)
    except Exception as e:  # transformers validates head and rope layouts with many exception types
        raise UnsupportedModel(f"{meta.path}: transformers rejects the {row.architecture} config it describes "
                               f"({type(e).__name__}: {str(e)[:300]})") from None


def unpermute_qk(weight, heads: int):
    """Undo llama.cpp's converter's `permute` (rows regrouped from halves to interleaved pairs)."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def gguf_state_dict(meta: GgufMetadata, config) -> dict[str, Any]:
    """HF parameter name -> float32 numpy array, for every parameter of the model class."""
    import gguf
    import numpy as np
    import torch
    import transformers

    row = gguf_architecture(meta)
    with torch.device("meta"):
        names = list(getattr(transformers, row.architecture)(config).state_dict())
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH[meta.arch.upper()], config.num_hidden_layers)
    state = {}
    for name in names:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name not in meta.tensors:
            raise UnsupportedModel(f"{meta.path}: no tensor for {name} (llama.cpp name {gguf_name!r})")
        values = meta.tensor_values(gguf_name)
        if row.permuted_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_attention_heads if "q_proj" in name else config.num_key_value_heads
            values = unpermute_qk(values, heads)
        if row.norm_shift and name.endswith("norm.weight"):
            values = values - np.float32(row.norm_shift)
        state[name] = np.array(values, copy=True, order="C")  # writable, independent of the memory map
    return state


def spm_tokenizer(meta: GgufMetadata):
    """llama.cpp's SentencePiece tokenizer ("llama" model) as a transformers fast tokenizer: BPE over
    the pieces with merges ranked by the merged piece's score (what llama.cpp's SPM merge loop does),
    byte fallback, spaces as ▁, the space prefix and BOS as the file says."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.tokenization_utils_base import generate_merges

    tokens = [str(t) for t in meta.value("tokenizer.ggml.tokens")]
    scores = meta.value("tokenizer.ggml.scores") or [0.0] * len(tokens)
    types = meta.value("tokenizer.ggml.token_type") or [1] * len(tokens)
    special = [t for t, kind in zip(tokens, types) if kind in (SPM_CONTROL, SPM_USER_DEFINED)]
    vocab = {t: i for i, t in enumerate(tokens)}
    merges = generate_merges(vocab, dict(zip(tokens, scores)), skip_tokens=special)
    unk_id = meta.value("tokenizer.ggml.unknown_token_id")
    model = models.BPE(vocab=vocab, merges=merges, unk_token=tokens[unk_id] if unk_id is not None else None,
                       byte_fallback=True, fuse_unk=True)
    tokenizer = Tokenizer(model)
    space_prefix = bool(meta.value("tokenizer.ggml.add_space_prefix", True))
    # llama.cpp prepends the space to every run of text that starts the input or follows a special
    # token, even one that starts with spaces: a normalizer (run per segment between added tokens),
    # not transformers' Metaspace, which skips text already starting with one
    steps = [normalizers.Prepend("▁")] if space_prefix else []
    tokenizer.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "▁")])
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(decode + ([decoders.Strip(" ", 1, 0)] if space_prefix else []))
    added_tokens(tokenizer, tokens, types)
    with_bos(tokenizer, meta, tokens, default=True)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_token_kwargs(meta, tokens))


# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp, llm_tokenizer_bpe), applied in order, each
# splitting the pieces the previous left (unmatched text stays a piece of its own), by the file's
# `tokenizer.ggml.pre`. The GPT-2-style ones end without transformers' final `|\s+`, which changes
# how a whitespace run before a digit splits (SmolLM2: "1.\n\n2." -> "\n\n", not "\n", "\n").
GPT2_WORDS = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_WORDS = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_WORDS = LLAMA3_WORDS.replace(r"\p{N}{1,3}", r"\p{N}")
BPE_PRE_TOKENIZERS: dict[str, tuple[list[str], bool]] = {  # pre -> (regexes, llama.cpp's ignore_merges)
    **{name: ([LLAMA3_WORDS], True) for name in ("llama3", "llama-v3", "llama-bpe")},
    **{name: ([QWEN2_WORDS], False) for name in ("qwen2", "deepseek-r1-qwen")},
    **{name: ([r"\p{N}", GPT2_WORDS], False) for name in ("smollm", "starcoder", "refact", "command-r")},
    **{name: ([GPT2_WORDS], False) for name in ("gpt-2", "phi-2", "olmo", "mpt")},
    "default": ([r"[\p{P}\$\+<=>\^~\|]+", GPT2_WORDS, r"\p{N}+", r"[0-9][0-9][0-9]"], False),
}


def special_token_kwargs(meta: GgufMetadata, tokens: list[str]) -> dict[str, str]:
    ids = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    return {name: tokens[i] for name, key in ids.items() if (i := meta.value(f"tokenizer.ggml.{key}_token_id")) is not None}


def added_tokens(tokenizer, tokens: list[str], types: list[int]) -> None:
    """Control tokens as special tokens, user-defined ones as plain added tokens (llama.cpp matches
    those in any text, and control tokens only when asked to parse special tokens)."""
    from tokenizers import AddedToken

    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == SPM_CONTROL])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == SPM_USER_DEFINED])


def with_bos(tokenizer, meta: GgufMetadata, tokens: list[str], default: bool) -> None:
    from tokenizers import processors

    bos_id = meta.value("tokenizer.ggml.bos_token_id")
    if bos_id is not None and meta.value("tokenizer.ggml.add_bos_token", default):
        bos = tokens[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                                 special_tokens=[(bos, bos_id)])


def bpe_tokenizer(meta: GgufMetadata):
    """llama.cpp's byte-level BPE tokenizer ("gpt2" model): its merges, its pre-tokenizer regexes."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    pre = str(meta.value("tokenizer.ggml.pre", "default"))
    if pre not in BPE_PRE_TOKENIZERS:
        raise UnsupportedModel(f"{meta.path}: GGUF pre-tokenizer {pre!r} is not read by Kiln; read: {', '.join(BPE_PRE_TOKENIZERS)}")
    regexes, ignore_merges = BPE_PRE_TOKENIZERS[pre]
    tokens = [str(t) for t in meta.value("tokenizer.ggml.tokens")]
    types = meta.value("tokenizer.ggml.token_type") or [1] * len(tokens)
    merges = [tuple(str(m).split(" ", 1)) for m in meta.value("tokenizer.ggml.merges") or []]
    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tokenizer.decoder = decoders.ByteLevel()
    added_tokens(tokenizer, tokens, types)
    with_bos(tokenizer, meta, tokens, default=pre in ("llama3", "llama-v3", "llama-bpe"))
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_token_kwargs(meta, tokens))


def gguf_tokenizer(meta: GgufMetadata):
    kind = meta.value("tokenizer.ggml.model")
    if kind == "llama":
        return spm_tokenizer(meta)
    if kind == "gpt2":
        return bpe_tokenizer(meta)
    raise UnsupportedModel(f"{meta.path}: GGUF tokenizer model {kind!r} is not read by Kiln; read: llama (SentencePiece), gpt2 (BPE)")


def gguf_to_checkpoint(gguf_file: Path, out_dir: Path, dtype: str = "float32") -> None:
    """Dequantize a GGUF file into an ordinary safetensors checkpoint (`dtype`) with its tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    meta = GgufMetadata(gguf_file)
    config = gguf_config(meta)
    tokenizer = gguf_tokenizer(meta)
    # the file's chat template (llama.cpp's convert_hf_to_gguf.py copies the model's): what `kiln
    # serve`'s chat completions render; written as chat_template.jinja by save_pretrained
    template = meta.value("tokenizer.chat_template")
    if isinstance(template, str) and template:
        tokenizer.chat_template = template
    state = {name: torch.from_numpy(values).to(getattr(torch, dtype)) for name, values in gguf_state_dict(meta, config).items()}
    out_dir.mkdir(parents=True, exist_ok=True)
    config.dtype = getattr(torch, dtype)
    config.save_pretrained(out_dir)
    GenerationConfig.from_model_config(config).save_pretrained(out_dir)
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out_dir)
