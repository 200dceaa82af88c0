#!/usr/bin/env bash
# The side environment for the OpenVINO GenAI peer (benchmarks/accuracy_peers.py): openvino-genai
# runs the model, optimum-intel exports it (`optimum-cli export openvino`, int4 weights through
# nncf), both from PyPI. Separate from Kiln's: optimum-intel pins its own transformers range.
# torch first and pinned (CPU build), as in the Makefile; PyPI's CUDA torchvision/torchaudio, if
# anything pulls them, break a CPU torch and are removed.
set -euo pipefail
VENV="${1:-$(dirname "$0")/../artifacts/bench/openvino-venv}"
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -qq --disable-pip-version-check"
$PIP torch==2.13.0
$PIP openvino==2026.4.1 openvino-genai==2026.4.1.0 openvino-tokenizers==2026.4.1.0 "optimum-intel[openvino]==2.2.0" nncf==3.4.0
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio 2>/dev/null || true
echo "OpenVINO GenAI environment ready: $VENV/bin/python"
