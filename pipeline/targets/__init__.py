"""Engine targets behind one small interface, chosen by `build.target`.

`REQUIREMENTS` is a static table (no imports) so `kiln check` can say what a target needs without
loading it; `unavailable_reason(name)` compares that table with this machine.
"""

from __future__ import annotations

import importlib.util
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

from pipeline.errors import MissingDependency


@dataclass(frozen=True)
class Requirement:
    packages: tuple[str, ...]  # importable module names
    pip_names: tuple[str, ...]
    needs_nvidia_gpu: bool


REQUIREMENTS: dict[str, Requirement] = {
    "onnxruntime-cpu": Requirement(("onnxruntime",), ("onnxruntime",), False),
    "onnxruntime-cuda": Requirement(("onnxruntime",), ("onnxruntime-gpu",), True),
    # torch (already in the build environment) holds the engine's device buffers and the CUDA stream.
    "tensorrt": Requirement(("tensorrt", "torch"), ("tensorrt", "torch"), True),
}


def nvidia_gpu_present() -> bool:
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def unavailable_reason(name: str) -> str | None:
    req = REQUIREMENTS[name]
    missing_pkgs = [pip for mod, pip in zip(req.packages, req.pip_names) if importlib.util.find_spec(mod) is None]
    why_not = "not installed here"
    if name == "onnxruntime-cuda" and not missing_pkgs:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            missing_pkgs, why_not = ["onnxruntime-gpu"], "the installed onnxruntime has no CUDAExecutionProvider"
    if name == "tensorrt" and not missing_pkgs and nvidia_gpu_present():
        import torch

        if not torch.cuda.is_available():
            missing_pkgs, why_not = ["torch with CUDA"], f"the installed torch {torch.__version__} cannot use the GPU"
    missing = []
    if req.needs_nvidia_gpu and not nvidia_gpu_present():
        missing.append("an NVIDIA GPU")
    if missing_pkgs:
        missing.append("the " + ", ".join(missing_pkgs) + " package" + ("s" if len(missing_pkgs) > 1 else ""))
    if missing:
        has = "this machine has neither" if len(missing) == 2 else why_not if missing_pkgs else "this machine has none"
        return f"target {name} needs " + " and ".join(missing) + f"; {has}"
    return None


class Target(Protocol):
    name: str

    def build(self, exported: Any, out_dir: Path, cfg: Any, log: Callable[[str], None],
              shared_cache: Path | None = None) -> dict[str, Any]:
        """Write the engine for the exported graph (an `OnnxModel`) into out_dir; return metadata
        (model_file, op counts, session options; `hardware` for GPU engines). `shared_cache` is a
        folder that outlives this build (TensorRT's timing cache)."""

    def load(self, engine_dir: Path, meta: dict[str, Any], threads: int | None = None):
        """A `CausalLM` (see modeling.runtime) running the built engine; `threads` overrides the build's."""


def recipe_problems(recipe: Any) -> list[str]:
    """What a target cannot take from a recipe, known without loading anything (`kiln check`)."""
    target, q = recipe.build.target, recipe.quantize
    problems = []
    if target == "tensorrt" and q.method != "none" and q.bits != 4:
        problems.append(f"quantize.bits: target tensorrt takes blocked DequantizeLinear for int4 weights only; "
                        f"allowed: 4 (got {q.bits})")
    if recipe.build.int4_compute != "fp32" and target != "onnxruntime-cpu":
        problems.append(f"build.int4_compute: {recipe.build.int4_compute} is ONNX Runtime CPU's MatMulNBits setting; "
                        f"target {target} allows: fp32")
    if recipe.validation.gates.max_gpu_memory_mb is not None and not REQUIREMENTS[target].needs_nvidia_gpu:
        problems.append(f"validate.gates.max_gpu_memory_mb: target {target} runs on the CPU; the gate applies to "
                        "onnxruntime-cuda and tensorrt")
    return problems


def get_target(name: str) -> Target:
    reason = unavailable_reason(name)
    if reason:
        raise MissingDependency(reason)
    if name == "tensorrt":
        from pipeline.targets.tensorrt import TensorRt

        return TensorRt()
    from pipeline.targets.onnxruntime_ep import OnnxRuntime

    return OnnxRuntime(name)
