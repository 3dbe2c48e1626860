#!/usr/bin/env python3
"""Write docs/cli.md, the command-line reference, from the typer app itself: typer's own Markdown generator
(typer.cli.get_docs_for_click, what `typer qrmfs.cli utils docs` runs), with each help's example block shown
as a console block. `make docs` runs this; tests/unit/test_docs.py fails when docs/cli.md is out of date.

    .venv/bin/python scripts/cli_docs.py            # rewrite docs/cli.md
    .venv/bin/python scripts/cli_docs.py --check    # exit 1 when docs/cli.md differs
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer
from typer.cli import get_docs_for_click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qrmfs import cli

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
HEADER = ("<!-- Generated from qrmfs/cli.py by scripts/cli_docs.py (`make docs`); do not edit by hand. -->\n\n")
# click's "\b" paragraph (kept unwrapped in --help): "Example:" and indented command lines
EXAMPLE = re.compile(r"\x08\nExample:\n((?:  .*\n?)+)")


def render() -> str:
    command = typer.main.get_command(cli.app)
    ctx = command.make_context("qrmfs", [], resilient_parsing=True)  # with the app's context_settings (-h)
    docs = get_docs_for_click(obj=command, ctx=ctx, name="qrmfs")

    def example(m: re.Match[str]) -> str:
        lines = [ln.strip() for ln in m.group(1).splitlines() if ln.strip()]
        return "**Example**:\n\n```console\n" + "".join(f"$ {ln}\n" for ln in lines) + "```\n"

    docs = EXAMPLE.sub(example, docs)
    assert "\x08" not in docs, "an unconverted \\b block is left in the help texts"
    return HEADER + re.sub(r"\n{3,}", "\n\n", docs).strip() + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if argv[1:] == ["--check"]:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is out of date: run `make docs`", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    print(f"wrote {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
