"""The quantization group-size check over a decoder's real Linear layers (from its `DecoderSpec`),
known before loading any weights: `kiln check` runs it before any work starts, and the quantize
stage runs it again on the loaded model for sources `check` could not see (hub ids)."""

from __future__ import annotations

from pipeline.modeling.decoder import DecoderSpec


def group_size_problem(layer: str, in_features: int, group_size: int) -> str | None:
    """The recipe error for one layer, naming the allowed sizes that would divide, or None."""
    if in_features % group_size == 0:
        return None
    fits = [g for g in (16, 32, 64, 128, 256) if in_features % g == 0]
    return (f"quantize.group_size: {group_size} does not divide in_features {in_features} of {layer}; "
            f"{' or '.join(map(str, fits)) or 'no allowed size'} would")


def group_size_problems(spec: DecoderSpec, group_size: int, ignored) -> list[str]:
    problems = (group_size_problem(layer, in_f, group_size) for layer, in_f in spec.quantizable_layers().items() if not ignored(layer))
    return [p for p in problems if p]
