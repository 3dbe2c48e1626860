"""docs/cli.md is generated from the typer app (scripts/cli_docs.py, `make docs`): it must match the CLI as it
is now, as the table of settings in docs/configuration.md must match qrmfs.config; and the docs point to the
project's own docs and headings, never to files users do not have."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("cli_docs", REPO / "scripts" / "cli_docs.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_in_sync_with_the_cli():
    expected = _generator().render()
    assert (REPO / "docs" / "cli.md").read_text() == expected, "docs/cli.md is out of date: run `make docs`"


def test_settings_table_is_in_sync_with_the_config_module():
    """docs/configuration.md describes each setting once: its table is qrmfs.config.SETTINGS rendered."""
    gen = _generator()
    assert (REPO / "docs" / "configuration.md").read_text() == gen.configuration_doc(), \
        "docs/configuration.md's table of settings is out of date: run `make docs`"


def test_cli_reference_covers_every_command_with_an_example():
    text = (REPO / "docs" / "cli.md").read_text()
    for command in ("create", "clone", "remove", "validate", "list", "flush", "check"):
        section = text.split(f"## `qrmfs {command}`", 1)[1].split("\n## ", 1)[0]
        assert re.search(rf"```console\n\$ qrmfs {command} ", section), command
    assert "\x08" not in text and "<str>" not in text


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_anchor(m) for m in re.findall(r"^#+ (.+)$", text, flags=re.M)}


DOCS = [REPO / "README.md", REPO / "bench" / "README.md", REPO / "bench" / "results" / "history.md",
        *sorted((REPO / "docs").glob("*.md"))]


def test_readme_links_resolve_inside_the_project():
    readme = (REPO / "README.md").read_text()
    assert "../shared" not in readme
    assert "docs/openqrm.md" in readme and "docs/cli.md" in readme
    for doc in (REPO / "docs").glob("*.md"):
        assert f"(docs/{doc.name})" in readme, f"the README does not link {doc.name}"


def test_every_link_of_the_docs_resolves_to_a_file_and_heading():
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
            if target.startswith(("http://", "https://")):
                continue
            file, _, anchor = target.partition("#")
            dest = (doc.parent / file).resolve() if file else doc
            assert dest.exists() and dest.is_relative_to(REPO), f"{doc.name}: {target}"
            if anchor:
                assert anchor in _anchors(dest), f"{doc.name}: {target}: no such heading"
