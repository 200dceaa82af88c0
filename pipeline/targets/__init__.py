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
    implemented: bool


REQUIREMENTS: dict[str, Requirement] = {
    "onnxruntime-cpu": Requirement(("onnxruntime",), ("onnxruntime",), False, True),
    "onnxruntime-cuda": Requirement(("onnxruntime",), ("onnxruntime-gpu",), True, False),
    "tensorrt": Requirement(("tensorrt",), ("tensorrt",), True, False),
}


def nvidia_gpu_present() -> bool:
    return Path("/dev/nvidia0").exists() or shutil.which("nvidia-smi") is not None


def unavailable_reason(name: str) -> str | None:
    req = REQUIREMENTS[name]
    missing_pkgs = [pip for mod, pip in zip(req.packages, req.pip_names) if importlib.util.find_spec(mod) is None]
    if name == "onnxruntime-cuda" and not missing_pkgs:
        import onnxruntime

        if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
            missing_pkgs = ["onnxruntime-gpu (the installed onnxruntime has no CUDAExecutionProvider)"]
    missing = []
    if req.needs_nvidia_gpu and not nvidia_gpu_present():
        missing.append("an NVIDIA GPU")
    if missing_pkgs:
        missing.append("the " + ", ".join(missing_pkgs) + " package")
    if missing:
        return f"target {name} needs " + " and ".join(missing) + "; this machine has none of that"
    if not req.implemented:
        return f"target {name}: the engine builder is not implemented yet in this Kiln version"
    return None


class Target(Protocol):
    name: str

    def build(self, exported: Any, out_dir: Path, cfg: Any, log: Callable[[str], None]) -> dict[str, Any]:
        """Write the engine for the exported graph (an `OnnxModel`) into out_dir; return metadata
        (model_file, op counts, session options)."""

    def load(self, engine_dir: Path, meta: dict[str, Any], threads: int | None = None):
        """A `CausalLM` (see modeling.runtime) running the built engine; `threads` overrides the build's."""


def get_target(name: str) -> Target:
    reason = unavailable_reason(name)
    if reason:
        raise MissingDependency(reason)
    from pipeline.targets.onnxruntime_cpu import OnnxRuntimeCpu

    return {"onnxruntime-cpu": OnnxRuntimeCpu()}[name]
