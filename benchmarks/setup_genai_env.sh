#!/usr/bin/env bash
# The side environment for the onnxruntime-genai peer in benchmarks/decode.py. Separate from Kiln's:
# onnxruntime-genai pins its own onnxruntime (1.32 for 0.18.0) and its model builder wants a newer
# transformers than llm-compressor allows. torch first and pinned (CPU build), as in the Makefile.
set -euo pipefail
VENV="${1:-$(dirname "$0")/../artifacts/bench/genai-venv}"
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -qq --disable-pip-version-check"
$PIP torch==2.13.0
$PIP onnxruntime-genai==0.18.0 onnx==1.23.2 onnx-ir==1.1.0 transformers==5.24.0 gguf==0.19.0
echo "onnxruntime-genai environment ready: $VENV/bin/python"
