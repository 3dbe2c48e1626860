#!/usr/bin/env python3
"""Write docs/cli.md, the command-line reference, from the typer app itself: typer's own Markdown generator
(typer.cli.get_docs_for_click, what `typer qrmfs.cli utils docs` runs), with each help's example block shown
as a console block; and the table of settings in docs/configuration.md from qrmfs.config.SETTINGS. `make docs`
runs this; tests/unit/test_docs.py fails when either is out of date.

    .venv/bin/python scripts/cli_docs.py            # rewrite docs/cli.md and the table in docs/configuration.md
    .venv/bin/python scripts/cli_docs.py --check    # exit 1 when either differs
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import typer
from typer.cli import get_docs_for_click

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from qrmfs import cli, config

OUT = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
CONFIG_DOC = OUT.parent / "configuration.md"
SETTINGS_BEGIN = "<!-- settings: generated from qrmfs/config.py SETTINGS by `make docs`; do not edit by hand -->\n"
SETTINGS_END = "<!-- end of settings -->\n"
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


def _toml(value: object) -> str:
    if value is None:
        return "not set"
    return f'`"{value}"`' if isinstance(value, str) else f"`{value}`"


def render_settings() -> str:
    """One row per setting of qrmfs.config.SETTINGS: where it goes, its type, default, meaning and rule."""
    types = {str: "string", int: "integer", config.NUMBER: "number"}
    rows = ["| setting | type | default | what it is, and its rule |", "|---|---|---|---|"]
    for s in config.SETTINGS:
        where = f"`[{s.section}]` " if s.section else ""
        rows.append(f"| {where}`{s.key}` | {types[s.type]} | {'required' if s.required else _toml(s.default)} "
                    f"| {s.doc} |")
    return SETTINGS_BEGIN + "\n".join(rows) + "\n" + SETTINGS_END


def configuration_doc() -> str:
    """docs/configuration.md with its table of settings rendered anew."""
    text = CONFIG_DOC.read_text()
    head, rest = text.split(SETTINGS_BEGIN, 1)
    return head + render_settings() + rest.split(SETTINGS_END, 1)[1]


def main(argv: list[str]) -> int:
    outputs = {OUT: render(), CONFIG_DOC: configuration_doc()}
    if argv[1:] == ["--check"]:
        stale = [p for p, text in outputs.items() if not p.exists() or p.read_text() != text]
        for p in stale:
            print(f"{p} is out of date: run `make docs`", file=sys.stderr)
        return 1 if stale else 0
    for p, text in outputs.items():
        p.write_text(text)
        print(f"wrote {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
