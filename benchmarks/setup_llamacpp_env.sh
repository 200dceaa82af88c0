#!/usr/bin/env bash
# The side environment for the llama.cpp peer (benchmarks/llamacpp_peer.py, benchmarks/accuracy_peers.py):
# llama-cpp-python (built from source here: a few minutes on 2 cores), and what llama.cpp's own
# convert_hf_to_gguf.py needs (torch first and pinned to the CPU build, transformers, sentencepiece).
# The converter itself comes from the llama.cpp tree inside llama-cpp-python's source distribution,
# unpacked under artifacts/bench/src/ (the same llama.cpp revision the bindings are built from).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
VENV="${1:-$HERE/../artifacts/bench/llamacpp-venv}"
VERSION=0.3.36
python3 -m venv "$VENV"
PIP="$VENV/bin/python -m pip install -qq --disable-pip-version-check"
$PIP torch==2.13.0
$PIP "llama-cpp-python==$VERSION" numpy transformers==5.17.0 sentencepiece safetensors
SRC="$HERE/../artifacts/bench/src"
mkdir -p "$SRC"
if [ ! -f "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp/convert_hf_to_gguf.py" ]; then
  "$VENV/bin/python" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC"
  tar xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
fi
# the same gguf-py revision as the converter (tests/llamacpp_gguf.py record reads GGUF vocabularies with it)
$PIP --no-deps "$SRC/llama_cpp_python-$VERSION/vendor/llama.cpp/gguf-py"
echo "llama.cpp environment ready: $VENV/bin/python; converter: $SRC/llama_cpp_python-$VERSION/vendor/llama.cpp"
