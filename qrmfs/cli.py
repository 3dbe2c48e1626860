"""The qrmfs command line (typer). Each command parses, calls one action, renders text or --json. Thin."""

from __future__ import annotations

import json
import shlex
import sys
from typing import Annotated, Any

import typer

from . import model
from .actions.common import Credentials, Env, resolve_credentials
from .config import load
from .errors import AbortedError, ConnectError, InvalidImageError, QrmfsError, UsageError
from .runner import Runner
from .ui import Ui

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Build diskless NFS-root filesystem images and register them with openQRM.")

Config = Annotated[str | None, typer.Option("--config", help="Config file (default: $QRMFS_CONFIG, "
                                            "~/.config/qrmfs/config.toml, /etc/qrmfs/config.toml).")]
Verbose = Annotated[bool, typer.Option("-v", "--verbose", help="Show every command qrmfs runs.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan; touch nothing.")]
TargetOpt = Annotated[str, typer.Option("-t", "--target", help="STORAGE:/full/path/IMAGE_NAME")]
User = Annotated[str | None, typer.Option("-u", "--username", help="openQRM user (administrator).")]
Password = Annotated[str | None, typer.Option("-p", "--password", help="openQRM password (shows in the process "
                                              "list: prefer --password-file or $QRMFS_PASSWORD).")]
PasswordFile = Annotated[str | None, typer.Option("--password-file", help="File whose first line is the "
                                                  "openQRM password.")]
OnlyPhysical = Annotated[bool, typer.Option("-o", "--only-physical", help="Create the image without registering "
                                            "it in openQRM.")]
Url = Annotated[str | None, typer.Option("--openqrm-url", help="openQRM base URL, e.g. http://host/openqrm "
                                         "(default: config [openqrm] url).")]


def _env(config: str | None, verbose: bool, as_json: bool) -> Env:
    ui = Ui(verbose=verbose)
    return Env(load(config), Runner(verbose=verbose, log=ui.debug if verbose else None), ui)


def _emit(result: dict[str, Any], as_json: bool, text: str) -> None:
    if as_json:
        print(json.dumps(result, indent=2, default=str))
    else:
        print(text)


def _warn_password_argv(password: str | None, ui: Ui) -> None:
    if password:
        ui.warn("-p/--password shows in the process list; use --password-file or $QRMFS_PASSWORD")


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def create(
    target: TargetOpt,
    location: Annotated[str, typer.Option("-l", "--location", help="HOST:/rootfs-location, or a local directory "
                                          "('/' = this system).")],
    name: Annotated[str | None, typer.Option("-s", "--filesystem-image", help="Image name (letters, digits, _); "
                                             "default: the target's last path component.")] = None,
    username: User = None,
    password: Password = None,
    password_file: PasswordFile = None,
    only_physical: OnlyPhysical = False,
    exclude: Annotated[list[str] | None, typer.Option("-e", "--exclude", help="Directory of the source not to "
                                                      "copy (repeatable).")] = None,
    private_add: Annotated[list[str] | None, typer.Option("--private-add", help="Directory private to each node "
                                                          "(repeatable).")] = None,
    private_exclude: Annotated[list[str] | None, typer.Option("--private-exclude", help="Directory inside a "
                                                              "private one that stays common (repeatable).")] = None,
    arch: Annotated[str | None, typer.Option("-a", "--arch", help="Architecture tag, e.g. i686, Opteron, Xeon, "
                                             "Any, x86_64.")] = None,
    keep_services: Annotated[bool, typer.Option("--keep-services/--remove-services", help="Keep (default) or mask "
                                                "services bound to the source machine's hardware.")] = True,
    keep_network: Annotated[bool, typer.Option("--keep-network/--remove-network", help="Keep or remove (default) "
                                               "the source's network configuration.")] = False,
    hostname: Annotated[str | None, typer.Option("--hostname", help="Hostname of the image.")] = None,
    shared: Annotated[bool, typer.Option("--shared", help="The image is shared by many nodes.")] = False,
    operating_system: Annotated[str | None, typer.Option("--operation-system", "--operating-system",
                                                         help="Operating system tag in openQRM.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing image (kept until the new one is "
                                        "published, then as .NAME.qrmfs-previous).")] = False,
    route: Annotated[str, typer.Option("--route", help="ssh (default: storage pulls from the source) or nfs "
                                       "(mount the export here, the manual's way).")] = "ssh",
    comment: Annotated[str | None, typer.Option("--comment", help="image_comment in openQRM.")] = None,
    openqrm_url: Url = None,
    dry_run: DryRun = False,
    as_json: Json = False,
    config: Config = None,
    verbose: Verbose = False,
) -> None:
    """Create a new NFS-root image on a storage server (and register it in openQRM)."""
    from .actions import create as act

    env = _env(config, verbose, as_json)
    t = model.named_target(name, target)
    image = t.name
    if route not in ("ssh", "nfs"):
        raise UsageError(f"invalid --route {route!r}: use ssh or nfs")
    adds, pexcl = model.private_dirs(private_add or [], private_exclude or [])
    req = act.CreateRequest(
        name=image, target=t, location=model.Location.parse(location), only_physical=only_physical,
        excludes=tuple(model.plain_path(e, "-e/--exclude directory") for e in exclude or []),
        private_add=tuple(adds), private_exclude=tuple(pexcl),
        arch=model.tag(arch, "architecture") if arch is not None else None,
        os_name=model.os_name(operating_system) if operating_system is not None else None,
        keep_services=keep_services, keep_network=keep_network,
        hostname=model.hostname(hostname) if hostname is not None else None, shared=shared, force=force, route=route,
        comment=comment, creds=_registration(env, only_physical, username, password, password_file, openqrm_url))
    if dry_run:
        plan = act.dry_run(req, env)
        _emit(plan, as_json, _plan_text(plan))
        return
    r = act.create(req, env)
    reg = r["registration"]["state"]
    _emit(r, as_json, f"created {r['target']} from {r['source']}: {r['files']} files, "
                      f"{r['bytes'] / 2**20:.1f} MiB; registration: {reg}")


def _plan_text(plan: dict[str, Any]) -> str:
    lines = [f"dry run: create {plan['image']} at {plan['target']} from {plan['source']} (route {plan['route']})",
             f"  staging: {plan['staging']}"]
    for c in plan["copies"]:
        lines.append(f"  copy {c['what']} on {c['runs_on']}:")
        lines.append("    " + shlex.join(c["argv"]))
    lines.append("  " + plan["note"])
    lines.append("  preparation:")
    lines += [f"    {s['step']}: {s['what']}" for s in plan["preparation"]]
    if plan["registration"]:
        lines.append("  registration (openQRM):")
        lines += [f"    GET {r['url']} {r['params'].get('image_command') or r['params'].get('event_name')}"
                  for r in plan["registration"]]
    else:
        lines.append("  registration: none (-o/--only-physical)")
    lines.append("nothing was changed")
    return "\n".join(lines)


def _registration(env: Env, only_physical: bool, username: str | None, password: str | None,
                  password_file: str | None, url: str | None) -> Credentials:
    if only_physical:
        return resolve_credentials(env.cfg, username, None, None, url)
    _warn_password_argv(password, env.ui)
    return resolve_credentials(env.cfg, username, password, password_file, url)


@app.command()
def clone(
    name: Annotated[str, typer.Option("-s", "--filesystem-image", help="Name of the new image.")],
    target: TargetOpt,
    source: Annotated[str, typer.Option("--from", help="The existing image: STORAGE:/path/EXISTING_NAME")],
    hostname: Annotated[str | None, typer.Option("--hostname", help="Hostname of the new image.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing image at the target.")] = False,
    username: User = None, password: Password = None, password_file: PasswordFile = None,
    only_physical: OnlyPhysical = False, openqrm_url: Url = None, dry_run: DryRun = False, as_json: Json = False,
    config: Config = None, verbose: Verbose = False,
) -> None:
    """Create a new image from an existing one (on the same or another storage server)."""
    from .actions import clone as act

    env = _env(config, verbose, as_json)
    t = model.named_target(name, target)
    req = act.CloneRequest(name=name, target=t, source=model.Target.parse(source, "--from"),
                           only_physical=only_physical, force=force,
                           hostname=model.hostname(hostname) if hostname is not None else None,
                           creds=_registration(env, only_physical, username, password, password_file, openqrm_url))
    if dry_run:
        plan = act.dry_run(req, env)
        _emit(plan, as_json, "\n".join([f"dry run: clone {plan['source']} to {plan['target']}"]
                                       + [f"  copy on {c['runs_on']}: {shlex.join(c['argv'])}" for c in plan["copies"]]
                                       + ["nothing was changed"]))
        return
    r = act.clone(req, env)
    _emit(r, as_json, f"cloned {req.source} to {r['target']}: {r['files']} files, {r['bytes'] / 2**20:.1f} MiB; "
                      f"registration: {r['registration']['state']}")


@app.command()
def remove(
    target: TargetOpt,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Remove a directory that is not a qrmfs image "
                                        "(still asks unless --yes).")] = False,
    username: User = None, password: Password = None, password_file: PasswordFile = None,
    only_physical: Annotated[bool, typer.Option("-o", "--only-physical", help="Remove without deregistering.")]
    = False,
    openqrm_url: Url = None, dry_run: DryRun = False, as_json: Json = False, config: Config = None,
    verbose: Verbose = False,
) -> None:
    """Remove an image from its storage server and deregister it from openQRM."""
    from .actions import remove as act

    env = _env(config, verbose, as_json)
    req = act.RemoveRequest(target=model.Target.parse(target), yes=yes, force=force, only_physical=only_physical,
                            dry_run=dry_run,
                            creds=_registration(env, only_physical, username, password, password_file, openqrm_url))

    def confirm(question: str) -> bool:
        if not sys.stdin.isatty():
            raise AbortedError(f"refusing to {question} without --yes (no terminal to ask)")
        return typer.confirm(question + "?", default=False, err=True)

    r = act.remove(req, env, confirm)
    _emit(r, as_json, f"would remove {r['remove']}" if dry_run else
          f"removed {r['removed']}; registration: {r['registration']['state']}")


@app.command()
def validate(
    target: TargetOpt,
    location: Annotated[str | None, typer.Option("-l", "--location", help="Also report drift from this source "
                                                 "(HOST:/rootfs or a local directory); changes nothing.")] = None,
    fix: Annotated[bool, typer.Option("-f", "--fix", help="Re-run the preparation: repair what can be repaired.")]
    = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --fix: list what it would repair; change "
                                          "nothing.")] = False,
    as_json: Json = False, config: Config = None, verbose: Verbose = False,
) -> None:
    """Check an image (and repair it with --fix); exit 0 only when it is clean."""
    from .actions import validate as act

    env = _env(config, verbose, as_json)
    req = act.ValidateRequest(target=model.Target.parse(target), fix=fix, dry_run=dry_run,
                              location=model.Location.parse(location) if location else None)
    r = act.validate(req, env)
    lines = []
    for f in r.get("fixed", []):
        lines.append(f"fixed    {f['step']:<15} {f['path']}: {f['problem']}")
    for f in r.get("would_fix", []):
        lines.append(f"would fix {f['step']:<14} {f['path']}: {f['problem']}")
    for f in r["findings"]:
        lines.append(f"problem  {f['step']:<15} {f['path']}: {f['problem']}"
                     + ("" if f["fixable"] else " (not repaired by --fix)") if not fix or dry_run else
                     f"LEFT     {f['step']:<15} {f['path']}: {f['problem']}")
    if "drift" in r:
        d = r["drift"]
        lines.append(f"drift from {d['source']}: {d['count']} difference(s)")
        lines += [f"  {c['change']} {c['path']}" for c in d["changes"]]
    lines.append(f"{r['target']}: " + ("clean" if r["clean"] else f"{len(r['findings'])} problem(s)"
                                       + ("" if fix else "; `qrmfs validate --fix` repairs the fixable ones")))
    _emit(r, as_json, "\n".join(lines))
    if not r["clean"]:
        raise typer.Exit(InvalidImageError.exit_code)


@app.command("list")
def list_(
    storage: Annotated[str | None, typer.Argument(help="A storage server (name in the config or address); "
                                                  "default: all configured.")] = None,
    as_json: Json = False, config: Config = None, verbose: Verbose = False,
) -> None:
    """List the images on the storage server(s)."""
    from .actions.listing import list_images

    env = _env(config, verbose, as_json)
    r = list_images(env, storage)
    if as_json:
        _emit(r, True, "")
    else:
        _table(r["images"])
    if r["errors"]:
        raise typer.Exit(ConnectError.exit_code)


def _table(images: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("STORAGE", "NAME", "SIZE", "FILES", "CREATED", "SOURCE", "TAGS", "VALID", "OPENQRM"):
        t.add_column(col, overflow="fold")
    for i in images:
        tags = " ".join(x for x in ("shared" if i["shared"] else "", i["arch"] or "", i["os"] or "") if x)
        size = f"{i['bytes'] / 2**30:.2f}G" if i["bytes"] is not None else "?"
        t.add_row(i["storage"], i["name"] + (f" (locked: {i['locked_by']})" if i["locked_by"] else ""), size,
                  str(i["files"]), i["created"] or "?", i["source"] or "?", tags, i["validation"],
                  i["registration"])
    Console(width=None if sys.stdout.isatty() else 200).print(t)
    if not images:
        print("no images")


@app.command()
def flush(username: User = None, password: Password = None, password_file: PasswordFile = None,
          openqrm_url: Url = None, as_json: Json = False, config: Config = None, verbose: Verbose = False) -> None:
    """Deliver the registrations waiting in the spool (openQRM was unreachable when they were made)."""
    from .actions.common import flush_spool

    env = _env(config, verbose, as_json)
    _warn_password_argv(password, env.ui)
    creds = resolve_credentials(env.cfg, username, password, password_file, openqrm_url)
    r = flush_spool(env, creds, quick=False)
    _emit(r, as_json, f"delivered {len(r['delivered'])}, still pending {len(r['pending'])}"
          + (f" ({', '.join(r['pending'])}; see {env.spool().dir})" if r["pending"] else ""))
    if r["pending"]:
        raise typer.Exit(13)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    as_json = "--json" in args
    try:
        rc = app(args=args, prog_name="qrmfs", standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except typer.TyperException as e:  # click's usage errors (missing or unknown option, bad value)
        show = getattr(e, "show", None)
        if show:
            show()
        else:
            print(f"qrmfs: error: {e.format_message()}", file=sys.stderr)
        if as_json:
            print(json.dumps({"ok": False, "error": {"kind": "usage", "exit_code": e.exit_code,
                                                     "message": e.format_message(), "detail": ""}}))
        return e.exit_code
    except typer.Abort:
        print("qrmfs: aborted", file=sys.stderr)
        return AbortedError.exit_code
    except QrmfsError as e:
        print(f"qrmfs: error: {e.message}", file=sys.stderr)
        if e.detail:
            print("\n".join("  | " + ln for ln in e.detail.splitlines()), file=sys.stderr)
        if as_json:
            print(json.dumps({"ok": False, "error": {"kind": e.kind, "exit_code": e.exit_code, "message": e.message,
                                                     "detail": e.detail}}))
        return e.exit_code
    except KeyboardInterrupt:
        print("qrmfs: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    sys.exit(main())
