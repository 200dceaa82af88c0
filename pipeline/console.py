"""Terminal output shared by every `kiln` command."""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from pipeline.errors import KilnError


def make_console() -> Console:
    # Without a terminal rich assumes 80 columns and wraps log lines; CI logs read better wider.
    return Console(width=None if sys.stdout.isatty() else 140, highlight=False)


def fail(console: Console, err: KilnError) -> None:
    console.print(f"[bold red]error[/bold red] ({type(err).__name__}, exit {err.exit_code}): {err}")
    raise typer.Exit(err.exit_code)
