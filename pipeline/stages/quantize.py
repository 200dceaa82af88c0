"""quantize: weight-only integer quantization of the Linear layers, by the backend the recipe names.

Output: `quantized.safetensors` (codes, scales, zero points per layer, Kiln's own format) and
`quant_report.json` (per-layer relative weight and output error against the float model the codes
approximate: the source, or for AWQ the source rescaled by its smoothing scales). The float weights stay in the source
artifact; nothing is copied. Memory stays bounded by the codes plus what each backend needs (RTN:
one float weight at a time; docs/decisions.md "Big checkpoints").
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.artifacts import QuantizedWeights, SourceCheckpoint, write_json_atomic
from pipeline.corpus import calibration_samples
from pipeline.errors import KilnError
from pipeline.memory import CHILD_PEAK_KEY, peak_rss_mb
from pipeline.modeling.hf import empty_causal_lm, load_tokenizer
from pipeline.modeling.shapes import group_size_problem
from pipeline.quantization import NEEDS_CALIBRATION, QuantizerOutput, get_quantizer, is_ignored
from pipeline.quantization.format import QuantizedLinear, save_quantized
from pipeline.quantization.reference import float_reference, quantized_reference
from pipeline.recipe import QuantizeConfig
from pipeline.runner import StageContext

if TYPE_CHECKING:
    import torch

REPORT_SAMPLES = 2  # calibration windows whose activations feed the per-layer report


class QuantizeError(KilnError):
    exit_code = 3


def linear_layers(model_dir: Path, ignore: tuple[str, ...]) -> tuple[dict[str, int], list[str]]:
    """in_features of every nn.Linear not ignored, in module order, and the ignored names: read from
    the model's structure alone (no weights loaded)."""
    import torch

    chosen, skipped = {}, []
    for name, module in empty_causal_lm(model_dir).named_modules():
        if isinstance(module, torch.nn.Linear):
            if is_ignored(name, ignore):
                skipped.append(name)
            else:
                chosen[name] = module.in_features
    return chosen, skipped


def check_group_size(in_features: dict[str, int], group_size: int) -> None:
    """The runtime guard for sources whose shapes `kiln check` could not know (hub ids)."""
    for name, width in in_features.items():
        problem = group_size_problem(name, width, group_size)
        if problem:
            raise QuantizeError(problem)


def relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    return float(np.linalg.norm(w - w_hat) / max(np.linalg.norm(w), 1e-12))


def output_error_sums(x, w, x_hat, w_hat) -> np.ndarray:
    """(||X Wᵀ − X̂ Ŵᵀ||², ||X Wᵀ||²) on one sample's tokens (torch tensors); summed over samples,
    `relative_output_error` turns them into the relative error over all of them."""
    import torch

    y, y_hat = x @ w.T, x_hat @ w_hat.T
    return np.array([float(torch.sum((y - y_hat) ** 2)), float(torch.sum(y**2))])


def relative_output_error(sums: np.ndarray) -> float:
    return float(np.sqrt(sums[0]) / max(np.sqrt(sums[1]), 1e-12))


def capture_inputs(model, layers: list[str], sample: list[int]) -> dict[str, "torch.Tensor"]:
    """Each listed Linear's input activations [tokens, in_features] on one sample; layers that read
    the same tensor (q/k/v, gate/up) share one stored copy."""
    import torch

    modules = dict(model.named_modules())
    captured: dict[str, torch.Tensor] = {}
    last: list = [None, None]  # (input tensor seen last, its stored copy)

    def keep(name, args):
        x = args[0]
        if x is not last[0]:
            last[:] = [x, x.detach().reshape(-1, x.shape[-1]).float().clone()]
        captured[name] = last[1]

    hooks = [modules[n].register_forward_hook(lambda _m, args, _out, n=n: keep(n, args)) for n in layers]
    try:
        with torch.inference_mode():
            model(torch.tensor([sample]))
    finally:
        for h in hooks:
            h.remove()
    return captured


def layer_report(model_dir: Path, result: QuantizerOutput, samples: list[list[int]], advance) -> dict[str, dict[str, float]]:
    """Per layer: relative weight error ||W − Ŵ|| / ||W|| and relative output error
    ||X Wᵀ − X̂ Ŵᵀ|| / ||X Wᵀ||: the layer's output in the quantized model (input X̂, weight Ŵ)
    against the float model's (X, W) on the same tokens; X̂ carries the error of the layers before.
    The float model is the source, or for a method that rescales it (AWQ) the rescaled source: an
    AWQ-smoothed up_proj's output is divided per channel by its scales, which is not error.

    Bounded memory: the float model's inputs X are kept (one copy per distinct input tensor), the
    float model is dropped, and the quantized model's pass computes each error in its hooks; float
    weights stream from the checkpoint one layer at a time."""
    import torch

    names = list(result.layers)
    float_model = float_reference(model_dir, names, result.overrides, result.float_weights)
    # only the float layers stay after the float model is dropped (a streamed one holds no weight)
    float_layers = {n: m for n, m in float_model.named_modules() if n in result.layers}
    inputs = []
    for sample in samples:
        inputs.append(capture_inputs(float_model, names, sample))
        advance(1)
    del float_model
    quantized_model = quantized_reference(model_dir, result.layers, result.overrides)
    modules = dict(quantized_model.named_modules())
    sums = {n: np.zeros(2) for n in names}  # ||Y − Ŷ||², ||Y||²
    weight_error: dict[str, float] = {}
    current: list[dict] = [{}]

    def measure(name, args):
        w = float_layers[name].weight.detach()  # read from the checkpoint now for a streamed layer
        w_hat = modules[name].weight
        if name not in weight_error:
            weight_error[name] = float(torch.linalg.norm(w - w_hat) / max(float(torch.linalg.norm(w)), 1e-12))
        sums[name] += output_error_sums(current[0][name], w, args[0].detach().reshape(-1, args[0].shape[-1]).float(), w_hat)

    hooks = [modules[n].register_forward_hook(lambda _m, args, _out, n=n: measure(n, args)) for n in names]
    try:
        with torch.inference_mode():
            for sample, captured in zip(samples, inputs):
                current[0] = captured
                quantized_model(torch.tensor([sample]))
                advance(1)
    finally:
        for h in hooks:
            h.remove()
    return {n: {"relative_weight_error": weight_error[n],
                "relative_output_error": relative_output_error(sums[n])} for n in names}


def run(cfg: QuantizeConfig, source: SourceCheckpoint, *, ctx: StageContext) -> QuantizedWeights:
    out_file = ctx.out_dir / "quantized.safetensors"
    meta = {"method": cfg.method, "backend": cfg.resolved_backend, "bits": cfg.bits, "group_size": cfg.group_size,
            "symmetric": cfg.symmetric}
    if cfg.method == "none":
        ctx.log("method none: no layer is quantized; export writes float weights")
        save_quantized(out_file, {}, {"method": "none"})
        write_json_atomic(ctx.out_dir / "quant_report.json", {"layers": {}})
        return QuantizedWeights(path=ctx.out_dir, meta={**meta, "layers": 0, "ignored": []})

    quantizer = get_quantizer(cfg.method, cfg.resolved_backend)
    in_features, ignored = linear_layers(source.model_dir, cfg.ignore)
    check_group_size(in_features, cfg.group_size)
    samples = calibration_samples(load_tokenizer(source.model_dir), cfg.calibration)
    calibration = samples if cfg.method in NEEDS_CALIBRATION else None
    if calibration:
        ctx.log(f"calibration: {len(samples)} samples × {cfg.calibration.seq_len} tokens (seed {cfg.calibration.seed})")
    with ctx.progress(f"{cfg.method} int{cfg.bits} ({cfg.resolved_backend})", total=len(in_features)) as advance:
        result = quantizer(source.model_dir, list(in_features), cfg, calibration, advance, scratch=ctx.out_dir)
    layers: dict[str, QuantizedLinear] = result.layers
    if result.overrides:
        from safetensors.numpy import save_file

        save_file(result.overrides, str(ctx.out_dir / "float_overrides.safetensors"))
        ctx.log(f"{len(result.overrides)} float tensors changed by {cfg.method} stored as overrides "
                f"({', '.join(list(result.overrides)[:3])}, ...)")
    report_samples = samples[:REPORT_SAMPLES]
    with ctx.progress("per-layer error report (float, then quantized model)", total=2 * len(report_samples)) as advance:
        report = layer_report(source.model_dir, result, report_samples, advance)
    save_quantized(out_file, layers, {"method": cfg.method})
    worst = sorted(report, key=lambda n: report[n]["relative_output_error"], reverse=True)[:5]
    write_json_atomic(ctx.out_dir / "quant_report.json", {"layers": report, "worst_by_output_error": worst,
                                                           "activation_samples": min(len(samples), REPORT_SAMPLES)})
    out_errors = [r["relative_output_error"] for r in report.values()]
    ctx.log(f"{len(layers)} layers quantized, {len(ignored)} kept in float ({', '.join(ignored) or 'none'}); "
            f"layer output error vs the source on calibration tokens: mean {np.mean(out_errors):.4f}; worst:")
    for name in worst:
        ctx.log(f"  {name}: output {report[name]['relative_output_error']:.4f}, weight {report[name]['relative_weight_error']:.4f}")
    return QuantizedWeights(
        path=ctx.out_dir,
        meta={**meta, "layers": len(layers), "ignored": ignored, "float_overrides": sorted(result.overrides),
              "mean_relative_weight_error": float(np.mean([r["relative_weight_error"] for r in report.values()])),
              "mean_relative_output_error": float(np.mean(out_errors)), "max_relative_output_error": float(np.max(out_errors)),
              # the process's peak so far: quantization's own peak when the source stage was reused
              "process_peak_rss_mb": peak_rss_mb(), CHILD_PEAK_KEY: result.child_peak_rss_mb},
    )
