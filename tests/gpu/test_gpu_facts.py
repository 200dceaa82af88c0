"""What Kiln reads from the NVIDIA driver, on any GPU machine (no TensorRT or onnxruntime-gpu
needed): the facts an engine is bound to, and the per-process GPU memory the max_gpu_memory_mb
gate uses. Marked `gpu`; skipped with the reason on machines without an NVIDIA GPU and CUDA torch.
The same checks ran as a script on a lent H200 (docs/gpu.md)."""

import importlib.util

import pytest

from pipeline.targets import nvidia_gpu_present

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not nvidia_gpu_present() or importlib.util.find_spec("torch") is None,
    reason="needs an NVIDIA GPU (nvidia-smi) and torch")]


def test_device_facts_name_the_gpu_and_driver():
    from pipeline.targets.gpu import device_facts

    facts = device_facts()
    assert facts["gpu_name"].startswith("NVIDIA") and facts["driver_version"]
    major, minor = facts["compute_capability"].split(".")
    assert major.isdigit() and minor.isdigit() and facts["gpu_memory_total_mb"] > 0


def test_process_gpu_memory_counts_what_this_process_holds():
    import torch

    from pipeline.targets.gpu import process_gpu_memory_mb

    if not torch.cuda.is_available():
        pytest.skip(f"torch {torch.__version__} cannot use the GPU")
    held = torch.empty(1024**3, dtype=torch.uint8, device="cuda")  # 1 GiB
    torch.cuda.synchronize()
    used = process_gpu_memory_mb()
    assert used is not None, "nvidia-smi lists no compute process for this PID (a container hiding PIDs?)"
    assert used >= 1024, used  # the tensor plus the CUDA context
    del held
