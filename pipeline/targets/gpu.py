"""Facts about this machine's NVIDIA GPU, for engine metadata, registry tags and the check that a
hardware-specific engine runs only where it was built. Read from `nvidia-smi` (ships with the
driver), so no CUDA Python package is needed to ask."""

from __future__ import annotations

import os
import shutil
import subprocess
from typing import Any

from pipeline.errors import EngineMismatch, MissingDependency

# What a TensorRT plan is tied to: TensorRT refuses plans from another version, and kernels are
# chosen for one GPU model (same compute capability is not enough for the tuned tactics).
ENGINE_BINDING_FACTS = ("tensorrt_version", "gpu_name", "compute_capability")


def nvidia_smi(query: str, *extra: str) -> list[list[str]]:
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise MissingDependency("nvidia-smi not found: this machine has no NVIDIA driver")
    out = subprocess.run([exe, f"--query-{query}", "--format=csv,noheader,nounits", *extra],
                         capture_output=True, text=True, timeout=30)
    if out.returncode != 0:
        raise MissingDependency(f"nvidia-smi failed: {out.stderr.strip() or out.stdout.strip()}")
    return [[cell.strip() for cell in line.split(",")] for line in out.stdout.strip().splitlines() if line.strip()]


def device_index() -> int:
    """The GPU this process uses: the first of CUDA_VISIBLE_DEVICES, as CUDA numbers them."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    return int(visible) if visible.isdigit() else 0


def device_facts() -> dict[str, Any]:
    rows = nvidia_smi("gpu=name,compute_cap,driver_version,memory.total", "-i", str(device_index()))
    name, capability, driver, memory = rows[0]
    facts: dict[str, Any] = {"gpu_name": name, "compute_capability": capability, "driver_version": driver,
                             "gpu_memory_total_mb": int(float(memory))}
    try:
        import torch

        facts["cuda_runtime"] = torch.version.cuda
    except ImportError:
        pass
    try:
        import tensorrt

        facts["tensorrt_version"] = tensorrt.__version__
    except ImportError:
        pass
    return facts


def check_engine_compatible(built: dict[str, Any], here: dict[str, Any], engine: str) -> None:
    """Refuse, before any inference, an engine built for another GPU model or TensorRT version."""
    differences = [f"{key}: built with {built.get(key)!r}, this machine has {here.get(key)!r}"
                   for key in ENGINE_BINDING_FACTS if built.get(key) != here.get(key)]
    if differences:
        raise EngineMismatch(f"{engine} cannot run here: " + "; ".join(differences)
                             + ". Rebuild it on this machine (kiln run with the same recipe).")


def process_gpu_memory_mb(pid: int | None = None) -> float | None:
    """GPU memory this process holds now (CUDA allocators keep their peak reserved, so after a run
    this is the run's peak); None when the driver does not report per-process use."""
    pid = os.getpid() if pid is None else pid
    for row in nvidia_smi("compute-apps=pid,used_memory"):
        if row and row[0] == str(pid) and row[1].replace(".", "", 1).isdigit():
            return float(row[1])
    return None


def gpu_tags(engine_meta: dict[str, Any]) -> dict[str, str]:
    """Registry tags naming the GPU an engine was built and validated on; none for CPU engines."""
    hardware = engine_meta.get("hardware")
    if not hardware:
        return {}
    tags = {"kiln.gpu": hardware["gpu_name"], "kiln.compute_capability": hardware["compute_capability"],
            "kiln.gpu_driver": hardware["driver_version"]}
    if hardware.get("tensorrt_version"):
        tags["kiln.tensorrt_version"] = hardware["tensorrt_version"]
    return tags
