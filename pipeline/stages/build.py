"""build: turn the verified ONNX graph into an engine for the recipe's target.

The engine folder is self-contained: the engine file(s), the session/engine options used, and the
tokenizer and generation files a runtime needs.
"""

from __future__ import annotations

import shutil

from pipeline.artifacts import Engine, OnnxModel
from pipeline.errors import StageFailed
from pipeline.modeling.decoder import DecoderSpec, check_positions
from pipeline.recipe import BuildConfig
from pipeline.runner import StageContext
from pipeline.stages.export import RUNTIME_FILES
from pipeline.targets import get_target


def run(cfg: BuildConfig, exported: OnnxModel, *, ctx: StageContext) -> Engine:
    # `kiln check` says this before any work for local sources; a hub source is first seen here
    too_long = check_positions(DecoderSpec.from_dict(exported.meta["decoder"]), cfg.max_sequence_length)
    if too_long:
        raise StageFailed("build", too_long)
    target = get_target(cfg.target)
    meta = target.build(exported, ctx.out_dir, cfg, ctx.log, shared_cache=ctx.run.cache_root / "shared" / cfg.target)
    for name in RUNTIME_FILES:
        if exported.file(name).is_file():
            shutil.copy2(exported.file(name), ctx.out_dir / name)
    expected = exported.meta.get("quantized_layers", 0)
    return Engine(path=ctx.out_dir, meta={**meta, "target": cfg.target, "quantized_layers": expected})
