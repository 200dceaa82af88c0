"""Tiny GGUF files written from a Hugging Face checkpoint with the `gguf` package's own writer and
tensor-name map (what llama.cpp's converter uses), so GGUF sources of other families can be tested
without downloading one. Float32 tensors only; a byte-level BPE tokenizer with two merges (the GGUF
tokenizer reader needs merges)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# llama.cpp stores Llama-layout q/k rows permuted for its rotary kernel; transformers undoes it on load
PERMUTES_QK = {"llama", "mistral"}


def permute_qk(weight: np.ndarray, heads: int) -> np.ndarray:
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(checkpoint: Path, out_file: Path) -> None:
    import gguf
    import transformers
    from safetensors.numpy import load_file

    from pipeline.modeling.hf import load_tokenizer

    cfg = transformers.AutoConfig.from_pretrained(checkpoint)
    arch = cfg.model_type
    writer = gguf.GGUFWriter(str(out_file), arch)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    tokenizer = load_tokenizer(checkpoint)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])]
    tokens += ["ĠĠ", "ĠĠĠĠ"] + [f"[PAD{i}]" for i in range(cfg.vocab_size - len(tokens) - 2)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([1] * len(tokens))
    writer.add_token_merges(["Ġ Ġ", "ĠĠ ĠĠ"])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), cfg.num_hidden_layers)
    for name, tensor in load_file(str(checkpoint / "model.safetensors")).items():
        if arch in PERMUTES_QK and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            tensor = permute_qk(tensor, heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), np.ascontiguousarray(tensor, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
