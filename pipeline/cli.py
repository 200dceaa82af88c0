"""`kiln`: run, plan and check recipes.

    kiln check recipes/smollm2-135m-int4-cpu.yaml
    kiln run recipes/smollm2-135m-int4-cpu.yaml --plan
    kiln run recipes/smollm2-135m-int4-cpu.yaml --set quantize.group_size=32
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pipeline.console import fail, make_console
from pipeline.errors import KilnError
from pipeline.metric_table import side_by_side
from pipeline.recipe import load_recipe
from pipeline.registry import commands as registry_commands
from pipeline.serving import access_commands
from pipeline.serving import commands as serving_commands

HELP_OPTIONS = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(add_completion=False, no_args_is_help=True, context_settings=HELP_OPTIONS,
                  help="Kiln: staged LLM compilation (quantize → ONNX → engine → validate → MLflow).")


def print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"kiln {version('kiln')}")
        raise typer.Exit()


@app.callback()
def kiln(version: Annotated[bool, typer.Option("--version", "-V", callback=print_version, is_eager=True,
                                               help="Print Kiln's version and exit.")] = False) -> None:
    """Kiln: staged LLM compilation (quantize → ONNX → engine → validate → MLflow)."""

RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.", show_default=False)]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="Override a recipe value: --set quantize.group_size=32 (repeatable).")]
ArtifactsOpt = Annotated[Optional[Path], typer.Option("--artifacts", help="Artifacts root (default: $KILN_ARTIFACTS or ./artifacts).")]


def quiet_libraries() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def make_run_context(artifacts: Path | None, console: Console):
    from pipeline.hashing import code_version
    from pipeline.runner import RunContext
    from pipeline.settings import Settings

    return RunContext(settings=Settings.from_env(artifacts), console=console, code_version=code_version())


@app.command()
def check(recipe: RecipeArg, set_: SetOpt = None, artifacts: ArtifactsOpt = None) -> None:
    """Validate a recipe without running it (loads no model).

    Example: kiln check recipes/tiny-llama-int4-cpu.yaml
    """
    from pipeline.plan import static_problems

    console = make_console()
    try:
        parsed = load_recipe(recipe, set_ or [])
    except KilnError as e:
        fail(console, e)
    problems = static_problems(parsed)
    for p in problems:
        console.print(f"[red]✗[/red] {p}")
    if problems:
        raise typer.Exit(max(p.exit_code for p in problems))
    console.print(f"[green]✓[/green] {recipe}: valid ({parsed.name}; target {parsed.build.target}; quantize {parsed.quantize.method})")


@app.command()
def run(
    recipe: RecipeArg,
    set_: SetOpt = None,
    artifacts: ArtifactsOpt = None,
    plan: Annotated[bool, typer.Option("--plan", help="Print which stages would be reused or built; run nothing.")] = False,
    ci: Annotated[bool, typer.Option("--ci", help="CI mode: a missed gate fails the run whatever on_gate_failure says; "
                                                  "a markdown summary goes to $GITHUB_STEP_SUMMARY (else stdout).")] = False,
    output: Annotated[Optional[Path], typer.Option("--output", help="Also put the engine, validation report and Triton "
                                                   "package in this folder (hard links; new, empty, or an earlier --output).")] = None,
) -> None:
    """Run a recipe: each stage is reused from the cache when its inputs are unchanged.

    Example: kiln run recipes/smollm2-135m-int4-cpu.yaml --output build/smollm2
    """
    from pipeline.plan import stages_for, static_problems
    from pipeline.run_output import check_output_dir, write_output
    from pipeline.runner import Runner

    console = make_console()
    overrides = [*(set_ or []), *(["validate.on_gate_failure=fail"] if ci else [])]
    ctx = None
    try:
        parsed = load_recipe(recipe, overrides)
        if output is not None:
            check_output_dir(output)
        problems = static_problems(parsed)
        if problems:
            for p in problems[1:]:
                console.print(f"[red]✗[/red] {p}")
            raise problems[0]
        ctx = make_run_context(artifacts, console)
        runner = Runner(ctx, stages_for(parsed, ctx, console.print, Path.cwd()))
        if plan:
            print_plan(console, runner.plan())
            return
        quiet_libraries()
        started = time.perf_counter()
        outcomes = runner.run()
    except KilnError as e:
        if ci and ctx is not None:
            write_ci_summary(ctx.settings.step_summary, failure_markdown(recipe, e))
        fail(console, e)
    summary = build_summary(parsed.name, outcomes, time.perf_counter() - started)
    if not (ci and ctx.settings.step_summary is None):  # else the markdown below is the summary, printed once
        print_summary(console, summary)
    out = ctx.settings.artifacts_root / "last_run.json"
    out.write_text(json.dumps(summary, indent=2))
    if output is not None:
        try:
            write_output(output, outcomes, summary)
        except (KilnError, OSError) as e:
            fail(console, e if isinstance(e, KilnError) else KilnError(f"--output {output}: {e}"))
        console.print(f"engine, validation report and Triton package in {output} (serve it with: kiln serve {output})")
    if ci:
        write_ci_summary(ctx.settings.step_summary, summary_markdown(summary, outcomes))


def write_ci_summary(path: Path | None, markdown: str) -> None:
    """Append to the job summary file (GitHub Actions appends every step's), else print."""
    if path is None:
        print(markdown)
        return
    with path.open("a") as f:
        f.write(markdown + "\n")


def nested_report(report: Path) -> str:
    """The validation report under the summary's `##` heading: its headings two levels down, its
    figure (a file beside it, not in the job summary) left out."""
    text = report.read_text().split("![")[0]
    return "\n".join("##" + line if line.startswith("#") else line for line in text.splitlines())


def summary_markdown(s: dict, outcomes) -> str:
    r = s["registered"]
    report = next(o for o in outcomes if o.name == "validate").artifact.path / "report.md"
    lines = [f"## Kiln: {s['recipe']} ({'gates passed' if s['validation_passed'] else 'gates missed'})", "",
             f"Registered **{r['model_name']}** version **{r['version']}** (run `{r['run_id']}`) on `{s['target']}`.", "",
             "| stage | status | seconds | peak RSS MB | disk MB |", "|---|---|---|---|---|",
             *(f"| {st['stage']} | {st['status']} | {st['seconds']:.1f} | {mb(st['resources'].get('peak_rss_mb'))} | "
               f"{mb(st['resources'].get('disk_written_mb'))} |" for st in s["stages"]), "",
             nested_report(report)]
    promote = f"kiln promote {r['model_name']} {r['version']} --to staging"
    return "\n".join(lines + ["", f"Next: `{promote}`"])


def failure_markdown(recipe: Path, err: KilnError) -> str:
    lines = [f"## Kiln: {recipe.name} failed ({type(err).__name__}, exit {err.exit_code})", "", "```", str(err), "```"]
    report = Path(getattr(err, "report_path", "") or "/nonexistent")
    if report.is_file():
        lines += ["", nested_report(report)]
    return "\n".join(lines)


def print_plan(console: Console, rows) -> None:
    table = Table(title="Plan")
    for col in ("stage", "action", "backend", "cache path"):
        table.add_column(col)
    for r in rows:
        action = "[green]reuse[/green]" if r.action == "reuse" else "[cyan]build[/cyan]"
        table.add_row(r.name, action, r.backend, str(r.path) if r.path else "(after upstream builds)")
    console.print(table)


def stage_resources(path: Path) -> dict:
    """What building a stage's entry cost (recorded by the runner; for a reused stage, when it was built)."""
    from pipeline.artifacts import read_manifest

    return read_manifest(path).get("resources") or {}


def mb(value) -> str:
    return "-" if value is None else f"{value:,.0f}"


def build_summary(name: str, outcomes, seconds: float) -> dict:
    by_name = {o.name: o for o in outcomes}
    metrics = dict(by_name["validate"].artifact.meta["metrics"])
    reg = dict(by_name["register"].artifact.meta)
    return {
        "recipe": name,
        "seconds": round(seconds, 2),
        "stages": [{"stage": o.name, "status": o.status, "seconds": round(o.seconds, 2), "key": o.key,
                    "path": str(o.artifact.path), "resources": stage_resources(o.artifact.path)} for o in outcomes],
        "metrics": metrics,
        "target": by_name["build"].artifact.meta["target"],
        "source_dtype": by_name["source"].artifact.dtype,
        "validation_passed": by_name["validate"].artifact.meta["passed"],
        "registered": {"model_name": reg["model_name"], "version": reg["version"], "run_id": reg["run_id"],
                       "tracking_uri": reg["tracking_uri"]},
    }


def print_summary(console: Console, s: dict) -> None:
    stages = Table(title=f"Kiln run: {s['recipe']} ({s['seconds']:.1f} s)")
    stages.add_column("stage")
    stages.add_column("status")
    stages.add_column("time (s)", justify="right")
    stages.add_column("peak RSS MB (children)", justify="right")
    stages.add_column("disk MB (linked)", justify="right")
    for st in s["stages"]:
        r = st["resources"]
        children = f" ({mb(r['children_peak_rss_mb'])})" if r.get("children_peak_rss_mb") else ""
        linked = f" ({mb(r['disk_linked_mb'])})" if r.get("disk_linked_mb") else ""
        stages.add_row(st["stage"], st["status"], f"{st['seconds']:.1f}", mb(r.get("peak_rss_mb")) + children,
                       (mb(r["disk_written_mb"]) if "disk_written_mb" in r else "-") + linked)
    console.print(stages)

    results = Table(title="Source vs build")
    results.add_column("metric")
    results.add_column(f"source (PyTorch {s['source_dtype']})", justify="right")
    results.add_column(f"build ({s['target']})", justify="right")
    for label, source, build in side_by_side(s["metrics"]):
        results.add_row(label, source, build)
    console.print(results)
    r = s["registered"]
    verdict = "[green]passed[/green]" if s["validation_passed"] else "[yellow]missed (warn)[/yellow]"
    console.print(f"Gates {verdict}. MLflow: [bold]{r['model_name']}[/bold] version [bold]{r['version']}[/bold] "
                  f"(run {r['run_id']}, store {r['tracking_uri']})")
    if s["validation_passed"]:  # what a user does next with a version that passed its gates
        console.print(f"Next: kiln promote {r['model_name']} {r['version']} --to staging   ·   kiln ui   ·   "
                      f"kiln serve models:/{r['model_name']}")


app.add_typer(registry_commands.models_app, name="models")
app.add_typer(access_commands.keys_app, name="keys")
app.add_typer(access_commands.audit_app, name="audit")
for command in (registry_commands.promote, registry_commands.rollback, registry_commands.ui, serving_commands.serve):
    app.command()(command)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
