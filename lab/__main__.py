"""`python -m lab up|status|down|demo|boot`: the developers' handle on the container lab."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import typer

from . import exports as _exports
from . import lab as _lab
from .images import LabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="The qrmfs container lab.")
NAME = typer.Option(_lab.DEFAULT_NAME, "--name", help="Lab name (containers, network and volume carry it).")
JSON = typer.Option(False, "--json", help="Print one JSON object.")
EXPORT = typer.Option(_exports.DEFAULT_KIND, "--export",
                      help="What /exports is: xfs (a loop-mounted XFS with reflinks) or plain (a docker volume). "
                           "/exports-plain is always a docker volume.")


EXPORTS_PLAIN = f"{_lab.EXPORT_ROOT}, {_lab.PLAIN_ROOT} (plain)"


def _print(info: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(info, indent=2))
        return
    h = info["hosts"]
    print(f"lab {info['name']} on network {info['network']}")
    ex = ", ".join(f"{p} ({fs})" for p, fs in h["storage"]["exports"].items())
    print(f"  storage  {h['storage']['address']}  ssh :22, NFS :2049 exports {ex}")
    print(f"  source   {h['source']['address']}  ssh :22")
    for role in info.get("storages", []):
        print(f"  {role:<8} {h[role]['address']}  ssh :22, NFS :2049 exports {EXPORTS_PLAIN}")
    for role, facts in sorted(info.get("sources", {}).items()):
        print(f"  {role:<8} {h[role]['address']}  ssh :22  ({facts['description']})")
    oq = info["openqrm"]
    print(f"  openqrm  {oq['url']}  (openQRM {oq['version']}; administrator {oq['user']}, password in "
          f"{oq['password_file']}; not an administrator: {oq['viewer']['user']}, password in "
          f"{oq['viewer']['password_file']})")
    print(f"           nfs-deployment id {oq['nfs_deployment_id']}; storage ids: "
          + ", ".join(f"{r} {i}" for r, i in sorted(oq["storage_ids"].items())))
    print(f"  mock     {info['openqrm_mock']['url']}  (the openQRM mock, for injected faults: /_mock/fault)")
    print(f"  ssh key  {info['ssh']['private_key']}   known_hosts {info['ssh']['known_hosts']}")
    print(f"  config   {info['config']}   (qrmfs --config {info['config']} ...)")


@app.command()
def up(name: str = NAME, as_json: bool = JSON, export: str = EXPORT,
       sources: str | None = typer.Option(None, "--sources",
                                          help="Also start more source hosts: `all`, or a comma list of "
                                               "sysv, trixie, bullseye, mounts."),
       storages: int = typer.Option(1, "--storages", help="How many storage servers: 2 or more adds storage2 "
                                                           "... (each with its own plain /exports and a "
                                                           "[storage.storageN] block in the config).")) -> None:
    """Start the lab (reuses a running one) and print where everything is."""
    _print(_lab.up(name, _lab.parse_sources(sources), export=export, storages=storages), as_json)


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


BOOT_TARGET = typer.Option(..., "-t", "--target",
                           help="The image: storage:/exports/NAME (or the storage's IP instead of `storage`).")
BOOT_SCRIPT = typer.Option(None, "--script", exists=True, dir_okay=False,
                           help="A sh script to run in the booted guest; its output is reported.")


@app.command()
def boot(target: str = BOOT_TARGET,  # noqa: PLR0913 - typer: one parameter per command-line option
         node_id: str | None = typer.Option(None, "--node-id", help="Node id, passed as qrmfs.node=ID."),
         hostname: str | None = typer.Option(None, "--hostname", help="Passed as qrmfs.hostname=NAME."),
         script: Path | None = BOOT_SCRIPT,
         timeout: float = typer.Option(300.0, "--timeout", help="Seconds until the boot counts as failed."),
         clean_poweroff: bool = typer.Option(False, "--clean-poweroff",
                                             help="End with an orderly shutdown instead of a forced one."),
         probe: bool = typer.Option(True, "--probe/--no-probe",
                                    help="--no-probe: add nothing to the boot (qrmfs.probe=0); the state is "
                                         "read from the console, and QEMU is stopped once it is known."),
         name: str = NAME, as_json: bool = JSON) -> None:
    """Boot an image from the lab's NFS storage in QEMU; exit 0 only when it reached its running state
    (systemd: multi-user.target; SysV init: runlevel 3 with its rc scripts done)."""
    from . import boot as _boot

    info = _lab.status(name)
    if info is None:
        print(f"lab {name} is not running (start it with `python -m lab up`)", file=sys.stderr)
        raise typer.Exit(1)
    path = _boot.parse_target(target, info)
    spec = _boot.BootSpec(path, node_id=node_id, script=script.read_text() if script else None, timeout=timeout,
                          hostname=hostname, clean_poweroff=clean_poweroff, probe=probe)
    r = _boot.boot(info, spec)
    if as_json:
        print(json.dumps(r.to_dict(), indent=2))
    else:
        _print_boot(path, r)
    raise typer.Exit(0 if r.ok else 1)


def _print_boot(path: str, r: Any) -> None:
    who = f"{path}" + (f" as node {r.node_id}" if r.node_id else "")
    if r.reached:
        up = f"guest uptime {r.guest_uptime}s; " if r.guest_uptime is not None else ""
        print(f"{who}: reached {r.state} after {r.seconds:.1f}s ({up}kernel {r.kernel}, "
              f"{'cold' if r.cold else 'warm'} preparation {r.prepare_seconds:.1f}s, {r.wall_seconds:.1f}s in all)")
    else:
        print(f"{who}: FAILED: {r.error}")
    rc = "" if r.rc_done is None else f", rc scripts {'done' if r.rc_done else 'NOT done'}"
    print(f"  init {r.init or '?'}" + (f", runlevel {r.runlevel}" if r.runlevel else "") + rc
          + f", system {r.system_state or '?'}, getty on the console: {'yes' if r.getty else 'no'}")
    print(f"  sshd: {r.sshd or 'no answer'}")
    print(f"  qrmfs-init set-up: {r.node_setup or 'did not run'}")
    if r.failed_units:
        print(f"  failed: {', '.join(r.failed_units)}")
    if r.script_rc is not None:
        print(f"  script exited {r.script_rc}:")
        print("".join(f"    {ln}\n" for ln in r.script_output.splitlines()), end="")
    if r.error and r.reached:
        print(f"  but: {r.error}")
    if r.log_tail:
        print("  --- end of the console log ---")
        print("".join(f"  {ln}\n" for ln in r.log_tail.splitlines()), end="")
    print(f"  console log {r.log_path}")
    if r.retried_after:
        print(f"  booted a second time: the first boot's guest kernel stalled ({r.retried_after})")


def main() -> None:
    try:
        app()
    except LabError as e:
        print(f"lab: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
