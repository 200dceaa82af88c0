"""ONNX Runtime's MatMulNBits kernels at batch 1 on SmolLM2-135M's matmul shapes: fp32 activations
(accuracy_level 0, the exact dequantized math) against int8 activations (4), with and without zero
points, side by side in one process.

    .venv/bin/python benchmarks/matmulnbits_kernels.py [--threads 2] [--block 32]

Each cell is the best of three timed loops of one single-node session (random int4 codes; the
kernels' speed does not depend on the values). The last line sums one decode step's matmuls
(30 layers' packed q/k/v, o, gate/up and down, plus lm_head) for each setting.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

# name: (K, N, matmuls per decode step) for the fused graph's packed projections.
SMOLLM2_SHAPES = {"qkv": (576, 960, 30), "o": (576, 576, 30), "gate_up": (576, 3072, 30), "down": (1536, 576, 30),
                  "lm_head": (576, 49152, 1)}
SETTINGS = [(zero_points, level) for zero_points in (True, False) for level in (0, 4)]


def single_node_session(k: int, n: int, block: int, zero_points: bool, accuracy_level: int, threads: int):
    blocks = k // block
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, size=(n, blocks, block), dtype=np.uint8)
    initializers = [numpy_helper.from_array((codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), "B"),
                    numpy_helper.from_array((rng.random(n * blocks, dtype=np.float32) * 0.01).astype(np.float32), "S")]
    inputs = ["X", "B", "S"]
    if zero_points:
        zp = rng.integers(0, 16, size=(n, blocks + blocks % 2), dtype=np.uint8)
        initializers.append(numpy_helper.from_array((zp[:, 0::2] | (zp[:, 1::2] << 4)).astype(np.uint8).reshape(-1), "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                            accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "matmulnbits", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def best_seconds(session, k: int, repeats: int) -> float:
    x = np.random.default_rng(1).standard_normal((1, k)).astype(np.float32)
    for _ in range(10):
        session.run(None, {"X": x})
    loops = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            session.run(None, {"X": x})
        loops.append((time.perf_counter() - start) / repeats)
    return min(loops)


def label(zero_points: bool, level: int) -> str:
    return f"{'asym' if zero_points else 'sym'} {'fp32' if level == 0 else 'int8'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--block", type=int, default=32)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, {args.threads} threads, block {args.block}; cells: µs per call (GMAC/s)")
    print(f"{'matmul':8s} {'K':>5s} {'N':>6s} | " + " | ".join(f"{label(*s):>20s}" for s in SETTINGS)
          + " | fp32÷int8 (asym) | asym÷sym (int8)")
    step = dict.fromkeys(SETTINGS, 0.0)
    for name, (k, n, count) in SMOLLM2_SHAPES.items():
        seconds = {}
        for zero_points, level in SETTINGS:
            session = single_node_session(k, n, args.block, zero_points, level, args.threads)
            seconds[(zero_points, level)] = best_seconds(session, k, 20 if n > 10000 else 100)
            step[(zero_points, level)] += seconds[(zero_points, level)] * count
        cells = " | ".join(f"{s * 1e6:8.1f} ({k * n / s / 1e9:5.1f})".rjust(20) for s in seconds.values())
        print(f"{name:8s} {k:5d} {n:6d} | {cells} | {seconds[(True, 0)] / seconds[(True, 4)]:16.2f} | "
              f"{seconds[(True, 4)] / seconds[(False, 4)]:15.2f}", flush=True)
    print("one decode step's matmuls: " + ", ".join(f"{label(*s)} {t * 1e3:.2f} ms" for s, t in step.items()))


if __name__ == "__main__":
    main()
