"""quantize: weight-only integer quantization of the Linear layers, by the backend the recipe names.

Output: `quantized.safetensors` (codes, scales, zero points per layer, Kiln's own format) and
`quant_report.json` (per-layer relative weight and output error against the float model the codes
approximate: the source, or for AWQ the source rescaled by its smoothing scales). The float weights stay in the source
artifact; nothing is copied.
"""

from __future__ import annotations

import numpy as np

from pipeline.artifacts import QuantizedWeights, SourceCheckpoint, write_json_atomic
from pipeline.corpus import calibration_samples
from pipeline.errors import KilnError
from pipeline.memory import peak_rss_mb
from pipeline.modeling.hf import SafetensorsWeights, load_causal_lm, load_tokenizer
from pipeline.modeling.shapes import group_size_problem
from pipeline.quantization import NEEDS_CALIBRATION, RESCALES_FLOAT_MODEL, get_quantizer, is_ignored
from pipeline.quantization.format import save_quantized
from pipeline.quantization.reference import quantized_reference, replaced_weights
from pipeline.recipe import QuantizeConfig
from pipeline.runner import StageContext

REPORT_SAMPLES = 2  # calibration windows whose activations feed the per-layer report


class QuantizeError(KilnError):
    exit_code = 3


def linear_weights(model, ignore: tuple[str, ...]) -> tuple[dict[str, np.ndarray], list[str]]:
    """Float weights [out, in] of every nn.Linear not ignored, in module order."""
    import torch

    chosen, skipped = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            if is_ignored(name, ignore):
                skipped.append(name)
            else:
                # a copy: GPTQ rewrites weights in place, and the report compares against the originals
                chosen[name] = module.weight.detach().float().numpy().copy()
    return chosen, skipped


def check_group_size(weights: dict[str, np.ndarray], group_size: int) -> None:
    """The runtime guard for sources whose shapes `kiln check` could not know (hub ids)."""
    for name, w in weights.items():
        problem = group_size_problem(name, w.shape[1], group_size)
        if problem:
            raise QuantizeError(problem)


def relative_error(w: np.ndarray, w_hat: np.ndarray) -> float:
    return float(np.linalg.norm(w - w_hat) / max(np.linalg.norm(w), 1e-12))


def changed_float_tensors(model, model_dir, quantized_layers: set[str]) -> dict[str, np.ndarray]:
    """Float tensors of the model that differ from the source checkpoint, other than the quantized
    layers' own weights (e.g. AWQ folds its scales into the RMSNorm weights)."""
    source = SafetensorsWeights(model_dir)
    changed = {}
    for name, tensor in model.state_dict().items():
        if name not in source or (name.endswith(".weight") and name.removesuffix(".weight") in quantized_layers):
            continue
        current = tensor.detach().float().numpy()
        if not np.array_equal(current, source[name]):
            changed[name] = current.copy()
    return changed


def capture_inputs(model, layers: list[str], samples: list[list[int]]) -> dict[str, np.ndarray]:
    """Each listed Linear's input activations [tokens, in_features] on the given samples (float model)."""
    import torch

    modules = dict(model.named_modules())
    captured: dict[str, list[np.ndarray]] = {n: [] for n in layers}
    hooks = [modules[n].register_forward_hook(lambda _m, args, _out, n=n: captured[n].append(
        args[0].detach().reshape(-1, args[0].shape[-1]).float().numpy().copy())) for n in layers]
    try:
        with torch.inference_mode():
            for sample in samples:
                model(torch.tensor([sample]))
    finally:
        for h in hooks:
            h.remove()
    return {n: np.concatenate(xs) for n, xs in captured.items()}


def output_error(x: np.ndarray, w: np.ndarray, x_hat: np.ndarray, w_hat: np.ndarray) -> float:
    """||X Wᵀ − X̂ Ŵᵀ|| / ||X Wᵀ||: the layer's output in the quantized model (input X̂, weight Ŵ)
    against the float model's (X, W) on the same tokens; X̂ carries the error of the layers before.
    The float model is the source, or for a method that rescales it (AWQ) the rescaled source: an
    AWQ-smoothed up_proj's output is divided per channel by its scales, which is not error."""
    return relative_error(x @ w.T, x_hat @ w_hat.T)


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
    model = load_causal_lm(source.model_dir)
    weights, ignored = linear_weights(model, cfg.ignore)
    check_group_size(weights, cfg.group_size)
    samples = calibration_samples(load_tokenizer(source.model_dir), cfg.calibration)
    calibration = samples if cfg.method in NEEDS_CALIBRATION else None
    if calibration:
        ctx.log(f"calibration: {len(samples)} samples × {cfg.calibration.seq_len} tokens (seed {cfg.calibration.seed})")
    # Source-side activations come from the float model before any method touches it (GPTQ
    # rewrites weights in place); REPORT_SAMPLES windows keep this cheap for every method.
    report_samples = samples[:REPORT_SAMPLES]
    activations = capture_inputs(model, list(weights), report_samples)
    with ctx.progress(f"{cfg.method} int{cfg.bits} ({cfg.resolved_backend})", total=len(weights)) as advance:
        layers = quantizer(model, list(weights), cfg, calibration, advance)
    overrides = changed_float_tensors(model, source.model_dir, set(layers))
    if cfg.method in RESCALES_FLOAT_MODEL:
        float_weights = {name: m.weight.detach().float().numpy().copy() for name, m in model.named_modules() if name in layers}
    else:
        float_weights = weights
    del model
    if overrides:
        from safetensors.numpy import save_file

        save_file(overrides, str(ctx.out_dir / "float_overrides.safetensors"))
        ctx.log(f"{len(overrides)} float tensors changed by {cfg.method} stored as overrides ({', '.join(list(overrides)[:3])}, ...)")
    if float_weights is not weights:
        activations = capture_inputs(replaced_weights(source.model_dir, float_weights, overrides), list(layers), report_samples)
    quantized_activations = capture_inputs(quantized_reference(source.model_dir, layers, overrides), list(layers), report_samples)
    report = {name: {"relative_weight_error": relative_error(float_weights[name], q.dequantize()),
                     "relative_output_error": output_error(activations[name], float_weights[name],
                                                           quantized_activations[name], q.dequantize())}
              for name, q in layers.items()}
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
        meta={**meta, "layers": len(layers), "ignored": ignored, "float_overrides": sorted(overrides),
              "mean_relative_weight_error": float(np.mean([r["relative_weight_error"] for r in report.values()])),
              "mean_relative_output_error": float(np.mean(out_errors)), "max_relative_output_error": float(np.max(out_errors)),
              # the process's peak so far: quantization's own peak when the source stage was reused
              "process_peak_rss_mb": peak_rss_mb()},
    )
