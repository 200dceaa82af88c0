"""The GitHub workflow a team copies: its recipe exists and validates, and every `kiln` command and
option it uses exists (so a rename in the CLI breaks this test, not the team's pipeline)."""

from __future__ import annotations

import re
import shlex

import yaml
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.recipe import load_recipe
from tests.conftest import ROOT

WORKFLOW = ROOT / ".github" / "workflows" / "recipe.yml"


def kiln_invocations(doc) -> list[list[str]]:
    calls = []
    for job in doc["jobs"].values():
        for step in job["steps"]:
            for line in str(step.get("run", "")).splitlines():
                if ".venv/bin/kiln " in line:
                    calls.append(shlex.split(line.split(".venv/bin/kiln ", 1)[1]))
    return calls


def test_workflow_recipe_and_kiln_commands_exist():
    doc = yaml.safe_load(WORKFLOW.read_text())
    recipe = re.search(r"'(recipes/[^']+\.yaml)'", doc["env"]["RECIPE"])[1]
    load_recipe(ROOT / recipe)
    calls = kiln_invocations(doc)
    assert {c[0] for c in calls} == {"check", "run", "promote"}
    runner = CliRunner()
    for call in calls:
        help_text = runner.invoke(app, [call[0], "--help"], terminal_width=200).output
        for option in (a for a in call if a.startswith("--")):
            assert option in help_text, f"kiln {call[0]} has no {option}"
    assert any(c[0] == "run" and "--ci" in c for c in calls)
    assert [c[c.index("--to") + 1] for c in calls if c[0] == "promote"] == ["staging", "production"]
