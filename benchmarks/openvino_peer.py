"""The OpenVINO peer, run inside its own environment (benchmarks/setup_openvino_env.sh).

    export --hf FOLDER --out DIR [--group-size 32]        optimum-cli export openvino --weight-format int4 (nncf;
                                                         its other defaults); group 32 as Kiln's recipes (nncf's
                                                         default 128 does not divide SmolLM2's 576 channels)
    ppl --model DIR --spec SPEC.json                     perplexity and greedy predictions over token windows,
                                                         the OpenVINO runtime (optimum-intel's model class)

The model is the one OpenVINO GenAI's LLMPipeline runs; optimum-intel's OVModelForCausalLM runs the
same IR on the same runtime and returns the logits at every position, which LLMPipeline does not.
Prints one JSON line last."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from window_scores import WindowScores


def export(hf: Path, out: Path, group_size: int) -> dict:
    cli = Path(sys.executable).with_name("optimum-cli")
    subprocess.run([str(cli), "export", "openvino", "--model", str(hf), "--task", "text-generation-with-past",
                    "--weight-format", "int4", "--group-size", str(group_size), str(out)], check=True)
    config = out / "openvino_config.json"
    return {"out": str(out), "quantization": json.loads(config.read_text()).get("quantization_config") if config.is_file() else None}


def perplexity(model_dir: Path, windows: list[list[int]], threads: int) -> dict:
    import torch
    from optimum.intel import OVModelForCausalLM

    model = OVModelForCausalLM.from_pretrained(model_dir, ov_config={"INFERENCE_NUM_THREADS": str(threads)})
    scores = WindowScores()
    for window in windows:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([window]), attention_mask=torch.ones(1, len(window), dtype=torch.long)).logits
        scores.add(logits[0].float().numpy(), window)
    return scores.result()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["export", "ppl"])
    parser.add_argument("--hf", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--group-size", type=int, default=32)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--spec", type=Path)
    args = parser.parse_args()
    if args.command == "export":
        result = export(args.hf, args.out, args.group_size)
    else:
        spec = json.loads(args.spec.read_text())
        result = perplexity(args.model, spec["windows"], spec.get("threads", 2))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
