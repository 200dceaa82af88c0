"""Linear layer input sizes of a Llama-family model, known before loading any weights: from
config.json, from GGUF metadata, or from the random-model spec. `kiln check` uses them to test the
quantization group size before any work starts."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class LlamaDims:
    hidden: int
    intermediate: int
    heads: int
    head_dim: int

    def in_features(self) -> dict[str, int]:
        """in_features of each Linear kind, named by its layer-0 instance."""
        p = "model.layers.0"
        return {
            f"{p}.self_attn.q_proj": self.hidden, f"{p}.self_attn.k_proj": self.hidden,
            f"{p}.self_attn.v_proj": self.hidden, f"{p}.self_attn.o_proj": self.heads * self.head_dim,
            f"{p}.mlp.gate_proj": self.hidden, f"{p}.mlp.up_proj": self.hidden,
            f"{p}.mlp.down_proj": self.intermediate, "lm_head": self.hidden,
        }


def from_hf_config(cfg: dict[str, Any]) -> LlamaDims:
    heads = cfg["num_attention_heads"]
    return LlamaDims(cfg["hidden_size"], cfg["intermediate_size"], heads, cfg.get("head_dim") or cfg["hidden_size"] // heads)


def from_gguf(path: Path) -> LlamaDims | None:
    from gguf import GGUFReader

    fields = GGUFReader(str(path)).fields

    def scalar(key: str):
        f = fields.get(key)
        return None if f is None else f.parts[f.data[0]].tolist()[0]

    arch = bytes(fields["general.architecture"].parts[fields["general.architecture"].data[0]]).decode()
    if arch != "llama":
        return None
    hidden, heads = scalar("llama.embedding_length"), scalar("llama.attention.head_count")
    head_dim = scalar("llama.attention.key_length") or hidden // heads
    return LlamaDims(hidden, scalar("llama.feed_forward_length"), heads, head_dim)


def group_size_problem(layer: str, in_features: int, group_size: int) -> str | None:
    """The recipe error for one layer, naming the allowed sizes that would divide, or None."""
    if in_features % group_size == 0:
        return None
    fits = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
    return (f"quantize.group_size: {group_size} does not divide in_features {in_features} of {layer}; "
            f"{' or '.join(map(str, fits)) or 'no allowed size'} would")


def group_size_problems(dims: LlamaDims, group_size: int, ignored) -> list[str]:
    problems = (group_size_problem(layer, in_f, group_size) for layer, in_f in dims.in_features().items() if not ignored(layer))
    return [p for p in problems if p]
