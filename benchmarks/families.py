"""Every supported family through Kiln's stages on a tiny random model of it: the family × (check,
export parity, fused parity, GPTQ) table in docs/results.md.

    .venv/bin/python benchmarks/families.py                  # all families, RTN and GPTQ
    .venv/bin/python benchmarks/families.py --families qwen2 phi3

For each family the tiny recipe (`recipes/tiny-llama-int4-cpu.yaml`) runs with
`source.random_model: {family: F}` (the family's own tiny shapes): `kiln check`'s static problems,
then with RTN every stage `kiln run` runs (source → quantize → export → build → validate → package
→ register, into a temporary MLflow store; gates set to warn, since a random model's accuracy
means nothing), and with GPTQ through llm-compressor (4 calibration windows of 64 tokens) the stages
up to build.
Export parity is the export stage's own check against transformers (every output, batch 3, 19
tokens after 7 cached); fused parity is the build stage's check of the fused ONNX Runtime graph
against the exported graph (max |Δlogits| / max |logit|, greedy tokens over 8 steps).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from pipeline.cli import make_run_context, quiet_libraries
from pipeline.modeling.decoder import FAMILIES
from pipeline.plan import run_stages, static_problems
from pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "recipes" / "tiny-llama-int4-cpu.yaml"
GPTQ = ["quantize.method=gptq", "quantize.calibration.samples=4", "quantize.calibration.seq_len=64"]
ALL_STAGES = ("source", "quantize", "export", "build", "validate", "package", "register")
UP_TO_BUILD = ALL_STAGES[:4]


def build(family: str, overrides: list[str], stages: tuple[str, ...], artifacts: Path, console: Console) -> dict:
    # the family's own tiny shapes (Phi-3's differ: ONNX Runtime's rotary needs 16 rotated dims)
    recipe = load_recipe(TINY, [f"source.random_model={{family: {family}, seed: 0}}", f"register.model_name=tiny-{family}",
                                "validate.on_gate_failure=warn", *overrides])
    problems = static_problems(recipe)
    if problems:
        return {"check": "; ".join(str(p) for p in problems)}
    t0 = time.perf_counter()
    done = run_stages(recipe, make_run_context(artifacts, console), stages, console.print, ROOT)
    verification = json.loads((done["export"].path / "verification.json").read_text())["outputs"]
    worst = max(verification, key=lambda r: r["max_abs_diff"] / r["limit"])
    fused = done["build"].meta["fusion_check"]
    return {"check": "ok", "export_ok": all(r["passed"] for r in verification), "outputs": len(verification),
            "export_worst": f"{worst['max_abs_diff']:.1e} / {worst['limit']:.1e}",
            "fused": f"{fused['max_rel_logit_diff']:.1e}", "greedy": fused["greedy_tokens_equal"],
            "layers": done["quantize"].meta["layers"], "seconds": time.perf_counter() - t0,
            "validate": done["validate"].meta["metrics"] if "validate" in done else None,
            "version": done["register"].meta["version"] if "register" in done else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="*", default=list(FAMILIES), choices=list(FAMILIES))
    args = parser.parse_args()
    quiet_libraries()
    console = Console(stderr=True)
    table = Table(title="Kiln per family (tiny random models, RTN and GPTQ int4 g32, onnxruntime-cpu fused graph)")
    for column in ("family", "architecture", "check", "export parity (outputs, worst |Δ| / limit)", "fused vs export (rel Δ, greedy)",
                   "GPTQ: layers, export parity, fused", "kiln run (RTN): ppl Δ, agreement, tok/s, version", "s"):
        table.add_column(column)
    with tempfile.TemporaryDirectory() as tmp:
        for family in args.families:
            rtn = build(family, [], ALL_STAGES, Path(tmp) / family / "rtn", console)
            if rtn["check"] != "ok":
                table.add_row(family, FAMILIES[family], rtn["check"], "", "", "", "", "")
                continue
            gptq = build(family, GPTQ, UP_TO_BUILD, Path(tmp) / family / "gptq", console)
            m = rtn["validate"]
            arch = FAMILIES[family]
            table.add_row(family, arch, rtn["check"],
                          f"{'✓' if rtn['export_ok'] else '✗'} {rtn['outputs']}, {rtn['export_worst']}",
                          f"{rtn['fused']}, {'identical' if rtn['greedy'] else 'DIFFERENT'}",
                          f"{gptq['layers']}, {'✓' if gptq['export_ok'] else '✗'} {gptq['export_worst']}, {gptq['fused']}"
                          f" {'identical' if gptq['greedy'] else 'DIFFERENT'}",
                          f"{m['ppl_increase_pct']:+.2f} %, {m['next_token_agreement']:.3f}, {m['tokens_per_s']:.0f}, v{rtn['version']}",
                          f"{rtn['seconds']:.0f}")
    Console(width=240).print(table)


if __name__ == "__main__":
    main()
