"""The stages, in order. Each module exposes `run(config, *inputs, ctx) -> Artifact`."""

from pipeline.stages import build, export, package, quantize, register, source, validate

STAGES = {
    "source": source.run,
    "quantize": quantize.run,
    "export": export.run,
    "build": build.run,
    "validate": validate.run,
    "package": package.run,  # only when the recipe has a `package` section
    "register": register.make_run,  # bound to the recipe text and store by pipeline.plan
}
STAGE_ORDER = tuple(STAGES)
