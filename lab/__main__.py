"""`python -m lab up|status|down|demo|boot`: the developers' handle on the container lab."""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from . import lab as _lab
from .images import LabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The qrmfs container lab.")
NAME = typer.Option(_lab.DEFAULT_NAME, "--name", help="Lab name (containers, network and volume carry it).")
JSON = typer.Option(False, "--json", help="Print one JSON object.")


def _print(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    h = info["hosts"]
    print(f"lab {info['name']} on network {info['network']}")
    print(f"  storage  {h['storage']['address']}  ssh :22, NFS :2049 export {h['storage']['export_root']}")
    print(f"  source   {h['source']['address']}  ssh :22")
    print(f"  openqrm  {info['openqrm']['url']}  ({info['openqrm']['user']}, password in "
          f"{info['openqrm']['password_file']})")
    print(f"  ssh key  {info['ssh']['private_key']}   known_hosts {info['ssh']['known_hosts']}")
    print(f"  config   {info['config']}   (qrmfs --config {info['config']} ...)")


@app.command()
def up(name: str = NAME, as_json: bool = JSON) -> None:
    """Start the lab (reuses a running one) and print where everything is."""
    _print(_lab.up(name), as_json)


@app.command()
def status(name: str = NAME, as_json: bool = JSON) -> None:
    """Print the running lab's hosts; exit 1 when it is not running."""
    info = _lab.status(name)
    if info is None:
        print(f"lab {name} is not running (start it with `python -m lab up`)", file=sys.stderr)
        raise typer.Exit(1)
    _print(info, as_json)


@app.command()
def down(name: str = NAME) -> None:
    """Remove every container, network and volume of the lab."""
    removed = _lab.down(name)
    print("\n".join(f"removed {r}" for r in removed) if removed else f"lab {name}: nothing to remove")


@app.command()
def demo(name: str = NAME) -> None:
    """The main job against the lab: create, validate and list an image of the source host."""
    from .demo import main as run_demo

    raise typer.Exit(run_demo(name))


def main() -> None:
    try:
        app()
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
