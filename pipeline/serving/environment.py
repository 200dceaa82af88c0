"""The serving environment: Triton's server binary and the model's Python packages, apart from Kiln's.

Triton's Python-backend stub needs numpy < 2 and the build pipeline needs numpy >= 2, so the model
runs in its own small virtual environment (no torch), as a production Triton model would. It is
created on first use (a minute or two: pip downloads nvidia-pytriton, 55 MB) and cached, keyed by
the pinned packages and the Python version.

`nvidia-pytriton` is used only for the `tritonserver` binary and Python backend it ships: pinned to
0.7.0 (Triton 2.51.0); unpinned beside numpy >= 2, pip falls back to 0.5.7, whose models answer
every inference with an empty tensor.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from pipeline.errors import MissingDependency
from pipeline.locking import file_lock

# opentelemetry: the model's own spans (queue wait, prefill, decode) when `kiln serve --otlp-endpoint` is on
# openvino: engines built with build.prefill_runtime: openvino run their prompts on it
PACKAGES = ("numpy==1.26.4", "onnxruntime==1.32.0", "openvino==2026.4.1", "tokenizers==0.23.3", "nvidia-pytriton==0.7.0",
            "opentelemetry-sdk==1.45.2", "opentelemetry-exporter-otlp-proto-http==1.45.2")
PY = f"{sys.version_info.major}.{sys.version_info.minor}"
READY = ".kiln-ready"


@dataclass(frozen=True)
class ServingEnvironment:
    root: Path

    @property
    def site_packages(self) -> Path:
        return self.root / "lib" / f"python{PY}" / "site-packages"

    @property
    def triton_dir(self) -> Path:
        return self.site_packages / "pytriton" / "tritonserver"

    @property
    def tritonserver(self) -> Path:
        return self.triton_dir / "bin" / "tritonserver"

    @property
    def backends(self) -> Path:
        return self.triton_dir / "backends"

    def process_env(self) -> dict[str, str]:
        """The backend stub links libpython and Triton's bundled libraries; the model imports from the
        serving environment only. Measured: with another interpreter's libpython the stub fails with
        "'_thread.RLock' object has no attribute '_recursion_count'"."""
        libs = [sysconfig.get_config_var("LIBDIR"), str(self.site_packages / "nvidia_pytriton.libs")]
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV"))}
        env.update({
            "LD_LIBRARY_PATH": ":".join(p for p in [*libs, os.environ.get("LD_LIBRARY_PATH", "")] if p),
            "PYTHONPATH": str(self.site_packages),
            "PATH": f"{self.root / 'bin'}:{os.environ.get('PATH', '')}",
        })
        return env


def default_location() -> Path:
    key = hashlib.sha256(f"{PY} {' '.join(PACKAGES)}".encode()).hexdigest()[:12]
    base = Path(os.environ.get("KILN_SERVING_ENV_DIR") or Path.home() / ".cache" / "kiln")
    return base / f"triton-env-py{PY}-{key}"


def ensure_environment(location: Path | None = None, log: Callable[[str], None] = print) -> ServingEnvironment:
    """The cached environment, created if missing or unfinished (one creator at a time)."""
    env = ServingEnvironment(location or default_location())
    with file_lock(env.root.with_name(env.root.name + ".lock")):
        if (env.root / READY).is_file():
            return env
        shutil.rmtree(env.root, ignore_errors=True)  # an unfinished earlier attempt
        log(f"creating the Triton serving environment in {env.root} ({', '.join(PACKAGES)}); this happens once")
        subprocess.run([sys.executable, "-m", "venv", str(env.root)], check=True)
        pip = [str(env.root / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", *PACKAGES]
        proc = subprocess.run(pip, capture_output=True, text=True)
        if proc.returncode != 0:
            raise MissingDependency(f"could not install the serving environment ({' '.join(PACKAGES)}):\n{proc.stderr[-2000:]}")
        stub = env.triton_dir / "python_backend_stubs" / PY / "triton_python_backend_stub"
        if not stub.is_file():
            raise MissingDependency(f"nvidia-pytriton has no Python-backend stub for Python {PY} ({stub})")
        shutil.copy2(stub, env.backends / "python" / stub.name)
        (env.root / READY).write_text(" ".join(PACKAGES) + "\n")
    return env
