"""Loading and writing ordinary Hugging Face checkpoints, safely.

Weights are read from safetensors only (pickle can run code on load), and a checkpoint's own
modelling code is never run (`trust_remote_code` is always off; docs/decisions.md says why). Heavy imports (torch, transformers) stay inside functions so that
`kiln check` and `kiln run --plan` start fast.
"""

from __future__ import annotations

import json
import shutil
import struct
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


def copy_checkpoint(src: Path, dst: Path, weights: bool = True) -> list[str]:
    """Copy the safe parts of a checkpoint folder (never pickle files); `weights=False` leaves out
    the *.safetensors files."""
    dst.mkdir(parents=True, exist_ok=True)
    copied = []
    for pattern in CHECKPOINT_PATTERNS:
        if pattern == "*.safetensors" and not weights:
            continue
        for p in sorted(src.glob(pattern)):
            if p.is_file():
                shutil.copy2(p, dst / p.name)
                copied.append(p.name)
    return copied


MAX_HEADER_BYTES = 100_000_000
# Names of the floating dtypes a recipe may ask for (`source.dtype`) and safetensors' names for them.
DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def safetensors_header(file: Path) -> dict[str, Any]:
    """A safetensors file's JSON header (names, dtypes, shapes, offsets), read without its tensors."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8).ljust(8, b"\0"))
        if size > MAX_HEADER_BYTES:  # safetensors' own limit; a larger one is a damaged or hostile file
            raise SourceError(f"{file}: safetensors header of {size} bytes (at most {MAX_HEADER_BYTES})")
        try:
            header = json.loads(f.read(size))
        except ValueError:
            raise SourceError(f"{file} is not a safetensors file (its header is not JSON)") from None
    header.pop("__metadata__", None)
    return header


def checkpoint_dtype(folder: Path) -> str:
    """The floating dtype holding most of a checkpoint's bytes: what `source.dtype: auto` keeps and
    what the PyTorch reference computes in."""
    names = {v: k for k, v in DTYPES.items()}
    weight: dict[str, int] = {}
    for file in sorted(folder.glob("*.safetensors")):
        for info in safetensors_header(file).values():
            if info["dtype"] in names:
                start, end = info["data_offsets"]
                weight[names[info["dtype"]]] = weight.get(names[info["dtype"]], 0) + end - start
    return max(weight, key=weight.get) if weight else "float32"


class SafetensorsWeights:
    """Lazy float32 numpy view of a checkpoint's *.safetensors shards (no pickle), with an optional
    file of overrides (float tensors a quantizer changed) taking precedence.

    Each read opens its shard and closes it again: safetensors maps the file, and pages of a mapping
    that stays open count in the process's resident memory, so a stage that walks a whole
    checkpoint through one open handle would look (and, under pressure, be) as large as the file."""

    def __init__(self, folder: Path, overrides: Path | None = None):
        files = sorted(folder.glob("*.safetensors")) + ([overrides] if overrides else [])
        self._where = {name: file for file in files for name in safetensors_header(file)}  # later files win

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def __iter__(self):
        return iter(self._where)

    def torch_tensor(self, name: str) -> "torch.Tensor":
        from safetensors import safe_open

        with safe_open(str(self._where[name]), framework="pt") as f:
            return f.get_tensor(name)

    def __getitem__(self, name: str):
        """As float32 (bf16 and fp16 widen exactly); integer tensors as they are."""
        t = self.torch_tensor(name)
        return (t.float() if t.is_floating_point() else t).numpy()


def model_class(config):
    import transformers

    return getattr(transformers, config.architectures[0])


def load_causal_lm(folder: Path, dtype: str = "float32") -> "torch.nn.Module":
    """transformers' stock class for the checkpoint, computing in `dtype` (`checkpoint_dtype` for the
    checkpoint's own precision)."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeline.modeling.decoder import spec_from_folder

    check_safetensors_only(folder)
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=getattr(torch, dtype), use_safetensors=True, trust_remote_code=False,
        attn_implementation=spec_from_folder(folder).reference_attention,
    )
    return model.eval()


def empty_causal_lm(folder: Path) -> "torch.nn.Module":
    """The checkpoint's model with every parameter on the meta device (no memory) and its buffers
    (rotary frequencies) real: a skeleton whose tensors the caller assigns one by one."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    from pipeline.modeling.decoder import spec_from_folder

    check_safetensors_only(folder)
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    config._attn_implementation = spec_from_folder(folder).reference_attention
    with init_empty_weights(include_buffers=False):
        model = model_class(config)(config)
    return model.eval()


def convert_checkpoint(src: Path, dst: Path, dtype: str) -> None:
    """Copy a checkpoint folder with its floating tensors cast to `dtype`, one shard at a time."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    copy_checkpoint(src, dst, weights=False)
    target = getattr(torch, dtype)
    for shard in sorted(src.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as f:
            tensors = {k: (t.to(target) if (t := f.get_tensor(k)).is_floating_point() else t) for k in f.keys()}
        save_file(tensors, str(dst / shard.name), metadata={"format": "pt"})
        del tensors
    index_file = dst / "model.safetensors.index.json"
    if index_file.is_file():  # a sharded checkpoint's index states the total size
        index = read_json(index_file)
        index.setdefault("metadata", {})["total_size"] = sum(
            end - start for shard in dst.glob("*.safetensors") for t in safetensors_header(shard).values()
            for start, end in [t["data_offsets"]])
        index_file.write_text(json.dumps(index, indent=2) + "\n")
    config_file = dst / "config.json"
    config = read_json(config_file)
    config["dtype"] = dtype
    config.pop("torch_dtype", None)
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


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
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )
    # ChatML, as SmolLM2 and Qwen use: test models get a chat template like real instruct models
    fast.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return fast


def make_random_model(spec: Any, out_dir: Path, dtype: str = "float32") -> None:
    """Write a random model of `spec.family` (safetensors, `dtype`) with a byte-level tokenizer."""
    import torch

    from pipeline.modeling.decoder import tiny_config

    tokenizer = byte_level_tokenizer()
    vocab = -(-len(tokenizer) // 8) * 8
    token_ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = tiny_config(spec.family, {"vocab_size": vocab, "tie_word_embeddings": False, **token_ids, **spec.config_kwargs()})
    torch.manual_seed(spec.seed)
    # built in `dtype` directly: a 3B model of real shapes would need 13 GB in float32 first
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))
    try:
        model = model_class(config)(config).eval()
    finally:
        torch.set_default_dtype(default)
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
