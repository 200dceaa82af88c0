"""Loading and writing ordinary Hugging Face checkpoints, safely.

Weights are read from safetensors only (pickle can run code on load), and a checkpoint's own
modelling code is never run (`trust_remote_code` is always off; docs/decisions.md says why). Heavy imports (torch, transformers) stay inside functions so that
`kiln check` and `kiln run --plan` start fast.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import KilnError
from pipeline.modeling.decoder import UnsupportedModel, architecture_of, read_json

if TYPE_CHECKING:
    import torch

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
# What a checkpoint folder may carry into the cache: configs, safetensors, tokenizer files.
CHECKPOINT_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken")


class SourceError(KilnError):
    exit_code = 3


def check_safetensors_only(folder: Path) -> None:
    has_safe = any(folder.glob("*.safetensors"))
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not has_safe:
        if pickles:
            raise SourceError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}). Kiln loads safetensors only, "
                "because unpickling can run arbitrary code. Convert the checkpoint to safetensors in a "
                "trusted environment (e.g. `model.save_pretrained(dir, safe_serialization=True)`) and "
                "point source.path at the result."
            )
        raise SourceError(f"{folder} holds no *.safetensors weights")


def read_config(folder: Path) -> dict[str, Any]:
    try:
        return read_json(folder / "config.json")
    except UnsupportedModel as e:
        raise SourceError(str(e)) from None


def check_config(config: dict[str, Any]) -> list[str]:
    """Refuses an architecture Kiln cannot describe; returns the `auto_map` entries of a checkpoint
    that ships its own modelling code, which Kiln ignores (transformers' stock class is used)."""
    try:
        architecture_of(config, "config.json")
    except UnsupportedModel as e:
        raise SourceError(str(e)) from None
    auto_map = config.get("auto_map") or {}
    return sorted(f"{k}: {v}" for k, v in auto_map.items()) if isinstance(auto_map, dict) else [str(auto_map)]


def copy_checkpoint(src: Path, dst: Path) -> list[str]:
    """Copy the safe parts of a checkpoint folder (never pickle files)."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in CHECKPOINT_PATTERNS:
        for p in sorted(src.glob(pattern)):
            if p.is_file():
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    return copied


class SafetensorsWeights:
    """Lazy numpy view of a checkpoint's *.safetensors shards (no torch, no pickle), with an
    optional file of overrides (float tensors a quantizer changed) taking precedence."""

    def __init__(self, folder: Path, overrides: Path | None = None):
        from safetensors import safe_open

        files = sorted(folder.glob("*.safetensors")) + ([overrides] if overrides else [])
        self._handles = [safe_open(str(p), framework="numpy") for p in files]
        self._where = {k: h for h in self._handles for k in h.keys()}  # later files win

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __getitem__(self, name: str):
        return self._where[name].get_tensor(name)


def load_causal_lm(folder: Path) -> "torch.nn.Module":
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.modeling.decoder import spec_from_folder

    check_safetensors_only(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, use_safetensors=True, trust_remote_code=False,
        attn_implementation=spec_from_folder(folder).reference_attention,
    )
    return model.eval()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def gguf_to_checkpoint(gguf_file: Path, out_dir: Path) -> None:
    """Dequantize a GGUF file into an ordinary fp32 safetensors checkpoint with its tokenizer."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_file.parent, gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the tensors are
    # already dequantized to fp32, so rebuild a plain model of the same class and copy them over.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = getattr(transformers, type(gguf_model).__name__)(config)
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    plain.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)


def byte_level_tokenizer():
    """A 257-token byte-level tokenizer (256 bytes + end-of-text), built offline for test models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def make_random_model(spec: Any, out_dir: Path) -> None:
    """Write a tiny random model of `spec.family` (safetensors) with a byte-level tokenizer."""
    import torch
    import transformers

    from pipeline.modeling.decoder import tiny_config

    tokenizer = byte_level_tokenizer()
    vocab = -(-len(tokenizer) // 8) * 8
    token_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = tiny_config(spec.family, {"vocab_size": vocab, "tie_word_embeddings": False, **token_ids, **spec.config_kwargs()})
    torch.manual_seed(spec.seed)
    model = getattr(transformers, config.architectures[0])(config).eval()
    # Random init gives near-uniform logits; a larger init scale makes quantization error visible,
    # and perturbed norm weights and biases make a wrong norm placement or offset visible too.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
            else:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
