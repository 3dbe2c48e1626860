"""The qrmfs command line (typer). Each command parses, calls one action, renders text or --json. Thin."""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import sys
from typing import Annotated

import typer

from . import __version__, journal, model
from .actions.common import Credentials, Env, resolve_credentials
from .completion import complete_host, complete_storage, complete_storage_name
from .config import load
from .errors import AbortedError, QrmfsError, UsageError, interrupt
from .results import Flushed, Result, render_json
from .runner import Runner
from .ui import Ui

app = typer.Typer(add_completion=True, no_args_is_help=True, rich_markup_mode=None,
                  context_settings={"help_option_names": ["-h", "--help"]},
                  help="Build diskless NFS-root filesystem images and register them with openQRM.",
                  epilog="\b\nExample:\n  qrmfs check && qrmfs create -t nas1:/exports/web1 -l web1:/")


def _show_version(value: bool) -> None:
    if value:
        print(f"qrmfs {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", callback=_show_version, is_eager=True,
                                                help="Print the version and exit.")] = False) -> None:
    pass


Config = Annotated[str | None, typer.Option("--config", metavar="FILE", help="Config file (default: $QRMFS_CONFIG, "
                                            "~/.config/qrmfs/config.toml, /etc/qrmfs/config.toml).")]
Verbose = Annotated[bool, typer.Option("-v", "--verbose", help="Show every command qrmfs runs.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON object on stdout.")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Print the plan; touch nothing.")]
TargetOpt = Annotated[str, typer.Option("-t", "--target", metavar="STORAGE:/PATH", autocompletion=complete_storage,
                                        help="The storage server and the image's full path, ending in its name.")]
User = Annotated[str | None, typer.Option("-u", "--username", metavar="USER", help="openQRM user (administrator).")]
Password = Annotated[str | None, typer.Option("-p", "--password", metavar="PASSWORD",
                                              help="openQRM password (shows in the process "
                                              "list: prefer --password-file or $QRMFS_PASSWORD).")]
PasswordFile = Annotated[str | None, typer.Option("--password-file", metavar="FILE",
                                                  help="File whose first line is the "
                                                  "openQRM password.")]
OnlyPhysical = Annotated[bool, typer.Option("-o", "--only-physical", help="Create the image without registering "
                                            "it in openQRM.")]
Url = Annotated[str | None, typer.Option("--openqrm-url", metavar="URL",
                                         help="openQRM base URL, e.g. http://host/openqrm "
                                         "(default: config [openqrm] url).")]


def _env(config: str | None, verbose: bool) -> Env:
    ui = Ui(verbose=verbose)
    return Env(load(config), Runner(verbose=verbose, log=ui.debug if verbose else None), ui)


def _emit(command: str, result: Result, as_json: bool) -> None:
    """The one place a command's result is shown: text for people, the JSON envelope with --json. A result
    whose answer is "no" (validate found problems, ...) then exits with its documented code."""
    failure = result.failure()
    print(render_json(command, result, failure) if as_json else result.text())
    if failure is not None:
        raise typer.Exit(failure.exit_code)


def _warn_password_argv(password: str | None, ui: Ui) -> None:
    if password:
        ui.warn("-p/--password shows in the process list; use --password-file or $QRMFS_PASSWORD")


@app.command(context_settings={"help_option_names": ["-h", "--help"]})
def create(  # noqa: PLR0913 - typer: one parameter per command-line option
    target: TargetOpt,
    location: Annotated[str, typer.Option("-l", "--location", metavar="HOST:/PATH", autocompletion=complete_host,
                                          help="The source root filesystem, or a local directory ('/' = this "
                                          "system).")],
    name: Annotated[str | None, typer.Option("-s", "--filesystem-image", metavar="NAME",
                                             help="Image name (letters, digits, _); "
                                             "default: the target's last path component.")] = None,
    username: User = None,
    password: Password = None,
    password_file: PasswordFile = None,
    only_physical: OnlyPhysical = False,
    exclude: Annotated[list[str] | None, typer.Option("-e", "--exclude", metavar="DIR",
                                                      help="Directory of the source not to "
                                                      "copy (repeatable).")] = None,
    private_add: Annotated[list[str] | None, typer.Option("--private-add", metavar="DIR",
                                                          help="Directory private to each node "
                                                          "(repeatable).")] = None,
    private_exclude: Annotated[list[str] | None, typer.Option("--private-exclude", metavar="DIR",
                                                              help="Directory inside a "
                                                              "private one that stays common (repeatable).")] = None,
    arch: Annotated[str | None, typer.Option("-a", "--arch", metavar="ARCH",
                                             help="Architecture tag, e.g. i686, Opteron, Xeon, "
                                             "Any, x86_64.")] = None,
    keep_services: Annotated[bool, typer.Option("--keep-services/--remove-services", help="Keep (default) or mask "
                                                "services bound to the source machine's hardware.")] = True,
    keep_network: Annotated[bool, typer.Option("--keep-network/--remove-network", help="Keep or remove (default) "
                                               "the source's network configuration.")] = False,
    hostname: Annotated[str | None, typer.Option("--hostname", metavar="HOSTNAME",
                                                 help="Hostname of the image.")] = None,
    shared: Annotated[bool, typer.Option("--shared", help="The image is shared by many nodes.")] = False,
    operating_system: Annotated[str | None, typer.Option("--operation-system", "--operating-system",
                                                         metavar="OS", help="Operating system tag in openQRM.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing image: a qrmfs image gets a new "
                                        "generation, as with update (the old one kept as .NAME.qrmfs-gen-N); any "
                                        "other directory is kept as .NAME.qrmfs-previous.")] = False,
    route: Annotated[str, typer.Option("--route", metavar="ssh|nfs",
                                       help="ssh (default: storage pulls from the source) or nfs "
                                       "(mount the export here, the manual's way).")] = "ssh",
    comment: Annotated[str | None, typer.Option("--comment", metavar="TEXT", help="image_comment in openQRM.")] = None,
    openqrm_url: Url = None,
    dry_run: DryRun = False,
    as_json: Json = False,
    config: Config = None,
    verbose: Verbose = False,
) -> None:
    """Create a new NFS-root image on a storage server (and register it in openQRM).

    \b
    Example:
      qrmfs create -t nas1:/exports/web1 -l web1:/ -e /srv/cache --password-file /etc/qrmfs/openqrm.password
    """
    from .actions import create as act

    env = _env(config, verbose)
    t = model.named_target(name, target)
    image = t.name
    try:
        how = model.Route(route)
    except ValueError:
        raise UsageError(f"invalid --route {route!r}: use ssh or nfs") from None
    adds, pexcl = model.private_dirs(private_add or [], private_exclude or [])
    req = act.CreateRequest(
        name=image, target=t, location=model.Location.parse(location), only_physical=only_physical,
        excludes=tuple(model.plain_path(e, "-e/--exclude directory") for e in exclude or []),
        private_add=tuple(adds), private_exclude=tuple(pexcl),
        arch=model.tag(arch, "architecture") if arch is not None else None,
        os_name=model.os_name(operating_system) if operating_system is not None else None,
        keep_services=keep_services, keep_network=keep_network,
        hostname=model.hostname(hostname) if hostname is not None else None, shared=shared, force=force,
        route=how,
        comment=comment, creds=_registration(env, only_physical, username, password, password_file, openqrm_url))
    _emit("create", act.dry_run(req, env) if dry_run else act.create(req, env), as_json)


def _registration(env: Env, only_physical: bool, username: str | None, password: str | None,
                  password_file: str | None, url: str | None) -> Credentials:
    if only_physical:
        return resolve_credentials(env.cfg, username, None, None, url)
    _warn_password_argv(password, env.ui)
    return resolve_credentials(env.cfg, username, password, password_file, url)


@app.command()
def clone(  # noqa: PLR0913 - typer: one parameter per command-line option
    name: Annotated[str, typer.Option("-s", "--filesystem-image", metavar="NAME", help="Name of the new image.")],
    target: TargetOpt,
    source: Annotated[str, typer.Option("--from", metavar="STORAGE:/PATH", autocompletion=complete_storage,
                                          help="The existing image.")],
    hostname: Annotated[str | None, typer.Option("--hostname", metavar="HOSTNAME",
                                                 help="Hostname of the new image.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing image at the target.")] = False,
    username: User = None, password: Password = None, password_file: PasswordFile = None,
    only_physical: OnlyPhysical = False, openqrm_url: Url = None, dry_run: DryRun = False, as_json: Json = False,
    config: Config = None, verbose: Verbose = False,
) -> None:
    """Create a new image from an existing one (on the same or another storage server).

    \b
    Example:
      qrmfs clone -s web2 -t nas1:/exports/web2 --from nas1:/exports/web1 --hostname web2
    """
    from .actions import clone as act

    env = _env(config, verbose)
    t = model.named_target(name, target)
    req = act.CloneRequest(name=name, target=t, source=model.Target.parse(source, "--from"),
                           only_physical=only_physical, force=force,
                           hostname=model.hostname(hostname) if hostname is not None else None,
                           creds=_registration(env, only_physical, username, password, password_file, openqrm_url))
    _emit("clone", act.dry_run(req, env) if dry_run else act.clone(req, env), as_json)


@app.command()
def remove(  # noqa: PLR0913 - typer: one parameter per command-line option
    target: TargetOpt,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Remove a directory that is not a qrmfs image "
                                        "(still asks unless --yes).")] = False,
    running_nodes_ok: Annotated[bool, typer.Option("--running-nodes-ok", help="Remove the image although nodes "
                                                   "run it (they get stale file handles); else refused, the "
                                                   "nodes named.")] = False,
    username: User = None, password: Password = None, password_file: PasswordFile = None,
    only_physical: Annotated[bool, typer.Option("-o", "--only-physical", help="Remove without deregistering.")]
    = False,
    openqrm_url: Url = None, dry_run: DryRun = False, as_json: Json = False, config: Config = None,
    verbose: Verbose = False,
) -> None:
    """Remove an image from its storage server and deregister it from openQRM.

    \b
    Example:
      qrmfs remove -t nas1:/exports/web1 --yes
    """
    from .actions import remove as act

    env = _env(config, verbose)
    req = act.RemoveRequest(target=model.Target.parse(target), yes=yes, force=force, running_ok=running_nodes_ok,
                            only_physical=only_physical,
                            dry_run=dry_run,
                            creds=_registration(env, only_physical, username, password, password_file, openqrm_url))

    def confirm(question: str) -> bool:
        if not sys.stdin.isatty():
            raise AbortedError(f"refusing to {question} without --yes (no terminal to ask)")
        return typer.confirm(question + "?", default=False, err=True)

    _emit("remove", act.remove(req, env, confirm), as_json)


@app.command()
def validate(  # noqa: PLR0913 - typer: one parameter per command-line option
    target: TargetOpt,
    location: Annotated[str | None, typer.Option("-l", "--location", metavar="HOST:/PATH",
                                                 autocompletion=complete_host, help="Also report drift from this "
                                                 "source (or a local directory); changes nothing.")] = None,
    fix: Annotated[bool, typer.Option("-f", "--fix", help="Re-run the preparation: repair what can be repaired.")]
    = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="With --fix: list what it would repair; change "
                                          "nothing.")] = False,
    as_json: Json = False, config: Config = None, verbose: Verbose = False,
) -> None:
    """Check an image (and repair it with --fix); exit 0 only when it is clean.

    \b
    Example:
      qrmfs validate -t nas1:/exports/web1 --fix
    """
    from .actions import validate as act

    env = _env(config, verbose)
    req = act.ValidateRequest(target=model.Target.parse(target), fix=fix, dry_run=dry_run,
                              location=model.Location.parse(location) if location else None)
    _emit("validate", act.validate(req, env), as_json)


@app.command("list")
def list_(
    storage: Annotated[str | None, typer.Argument(metavar="STORAGE", autocompletion=complete_storage_name,
                                                  hidden=True)] = None,
    generations: Annotated[bool, typer.Option("--generations", help="Show each image's generations: when, from "
                                              "which source, what changed, what each costs.")] = False,
    target: Annotated[str | None, typer.Option("-t", "--target", metavar="STORAGE:/PATH",
                                               help="With --generations: only this image.")] = None,
    as_json: Json = False, config: Config = None, verbose: Verbose = False,
) -> None:
    """List the images on STORAGE (a name in the config or an address), or on every configured storage server.

    \b
    Example:
      qrmfs list nas1 --json
    """
    from .actions.listing import list_images

    env = _env(config, verbose)
    if target is not None and not generations:
        raise UsageError("-t/--target goes with --generations")
    if generations:
        from .actions.update import generations_listing

        _emit("list", generations_listing(env, storage, model.Target.parse(target) if target else None), as_json)
        return
    _emit("list", list_images(env, storage), as_json)


def _flag(value: bool | None, key: str, into: dict[str, object]) -> None:
    if value is not None:
        into[key] = value


@app.command()
def update(  # noqa: PLR0913 - typer: one parameter per command-line option
    target: TargetOpt,
    location: Annotated[str | None, typer.Option("-l", "--location", metavar="HOST:/PATH",
                                                 help="The source (default: the one in the image's manifest).")]
    = None,
    exclude: Annotated[list[str] | None, typer.Option("-e", "--exclude", metavar="DIR", help="Directory of the "
                                                      "source not to copy (repeatable; replaces the recorded list).")]
    = None,
    private_add: Annotated[list[str] | None, typer.Option("--private-add", metavar="DIR", help="Directory private "
                                                          "to each node (repeatable; replaces the recorded list).")]
    = None,
    private_exclude: Annotated[list[str] | None, typer.Option("--private-exclude", metavar="DIR", help="Directory "
                                                              "inside a private one that stays common.")] = None,
    arch: Annotated[str | None, typer.Option("-a", "--arch", metavar="TAG", help="Architecture tag.")] = None,
    operating_system: Annotated[str | None, typer.Option("--operation-system", "--operating-system", metavar="TAG",
                                                         help="Operating system tag.")] = None,
    keep_services: Annotated[bool | None, typer.Option("--keep-services/--remove-services",
                                                       help="Override the recorded choice.")] = None,
    keep_network: Annotated[bool | None, typer.Option("--keep-network/--remove-network",
                                                      help="Override the recorded choice.")] = None,
    hostname: Annotated[str | None, typer.Option("--hostname", metavar="NAME", help="Hostname of the image.")]
    = None,
    shared: Annotated[bool | None, typer.Option("--shared/--not-shared", help="Override the recorded choice.")]
    = None,
    route: Annotated[str | None, typer.Option("--route", metavar="ssh|nfs", help="Default: the recorded one.")]
    = None,
    username: User = None, password: Password = None, password_file: PasswordFile = None,
    only_physical: Annotated[bool, typer.Option("-o", "--only-physical", help="Send openQRM nothing.")] = False,
    openqrm_url: Url = None, dry_run: Annotated[bool, typer.Option("--dry-run", help="Print what would change "
                                                                   "(rsync's itemized changes); touch nothing.")]
    = False,
    keep_generations: Annotated[int | None, typer.Option("--keep-generations", metavar="N", min=0,
                                                         help="Earlier generations to keep after this update "
                                                              "(default: keep_generations of the config).")] = None,
    as_json: Json = False, config: Config = None, verbose: Verbose = False,
) -> None:
    """Re-pull an image from its source into a new generation (incremental, atomic, node state kept).

    \b
    Example:
      qrmfs update -t nas1:/exports/web1 --dry-run
    """
    from .actions import update as act

    env = _env(config, verbose)
    if keep_generations is not None:
        env.cfg = dataclasses.replace(env.cfg, keep_generations=keep_generations)
    t = model.Target.parse(target)
    over: dict[str, object] = {}
    if exclude is not None:
        over["excludes"] = [model.plain_path(e, "-e/--exclude directory") for e in exclude]
    if private_add is not None or private_exclude is not None:
        adds, pexcl = model.private_dirs(private_add or [], private_exclude or [])
        if private_add is not None:
            over["private_add"] = adds
        if private_exclude is not None:
            over["private_exclude"] = pexcl
    if arch is not None:
        over["arch"] = model.tag(arch, "architecture")
    if operating_system is not None:
        over["os"] = model.os_name(operating_system)
    if hostname is not None:
        over["hostname"] = model.hostname(hostname)
    _flag(keep_services, "keep_services", over)
    _flag(keep_network, "keep_network", over)
    _flag(shared, "shared", over)
    try:
        how = model.Route(route) if route else None
    except ValueError:
        raise UsageError(f"invalid --route {route!r}: use ssh or nfs") from None
    req = act.UpdateRequest(target=t, location=model.Location.parse(location) if location else None, overrides=over,
                            only_physical=only_physical, route=how, dry_run=dry_run,
                            creds=_registration(env, only_physical, username, password, password_file, openqrm_url))
    _emit("update", act.update(req, env), as_json)


@app.command()
def rollback(  # noqa: PLR0913 - typer: one parameter per command-line option
    target: TargetOpt,
    username: User = None, password: Password = None, password_file: PasswordFile = None,
    only_physical: Annotated[bool, typer.Option("-o", "--only-physical", help="Send openQRM nothing.")] = False,
    openqrm_url: Url = None, dry_run: DryRun = False, as_json: Json = False, config: Config = None,
    verbose: Verbose = False,
) -> None:
    """Make the newest earlier generation of an image current again (node state kept).

    \b
    Example:
      qrmfs rollback -t nas1:/exports/web1
    """
    from .actions import update as act

    env = _env(config, verbose)
    req = act.RollbackRequest(target=model.Target.parse(target), only_physical=only_physical, dry_run=dry_run,
                              creds=_registration(env, only_physical, username, password, password_file,
                                                  openqrm_url))
    _emit("rollback", act.rollback(req, env), as_json)


@app.command()
def gc(
    storage: Annotated[str | None, typer.Argument(metavar="STORAGE", autocompletion=complete_storage_name,
                                                  hidden=True)] = None,
    as_json: Json = False, config: Config = None, verbose: Verbose = False,
) -> None:
    """Remove what unfinished operations left beside the images on STORAGE (or every configured server):
    staging copies, pinned source keys, lock files without an image, and earlier generations beyond
    keep_generations that updates kept while nodes ran them and that no node runs any more. Each image's go
    under its lock; what an operation or a node still holds is kept. `qrmfs list` shows them.

    \b
    Example:
      qrmfs gc nas1
    """
    from .actions.gc import gc as collect

    env = _env(config, verbose)
    _emit("gc", collect(env, storage), as_json)


@app.command()
def flush(username: User = None,  # noqa: PLR0913 - typer: one parameter per command-line option
          password: Password = None, password_file: PasswordFile = None,
          openqrm_url: Url = None, as_json: Json = False, config: Config = None, verbose: Verbose = False) -> None:
    """Deliver the registrations waiting in the spool (openQRM was unreachable when they were made).

    \b
    Example:
      qrmfs flush --password-file /etc/qrmfs/openqrm.password
    """
    from .actions.delivery import flush_spool

    env = _env(config, verbose)
    _warn_password_argv(password, env.ui)
    creds = resolve_credentials(env.cfg, username, password, password_file, openqrm_url)
    r = flush_spool(env, creds, quick=False)
    _emit("flush", Flushed(r["delivered"], r["pending"], str(env.spool().dir)), as_json)


@app.command()
def check(  # noqa: PLR0913 - typer: one parameter per command-line option
    target: Annotated[list[str] | None, typer.Option(
        "-t", "--target", metavar="STORAGE[:/PATH/NAME]", autocompletion=complete_storage,
        help="A storage server, or where an image would go (repeatable); default: every configured one.")] = None,
    location: Annotated[list[str] | None, typer.Option(
        "-l", "--location", metavar="HOST:/PATH", autocompletion=complete_host,
        help="A source, HOST:/rootfs or a local directory (repeatable); default: / of every configured host.")]
    = None,
    username: User = None, password: Password = None, password_file: PasswordFile = None, openqrm_url: Url = None,
    as_json: Json = False, config: Config = None, verbose: Verbose = False,
) -> None:
    """Check that everything create needs is in place, before a long copy; exit 0 only when nothing fails.

    \b
    Example:
      qrmfs check -t nas1:/exports/web1 -l web1:/
    """
    from .actions import check as act

    ui = Ui(verbose=verbose)
    _warn_password_argv(password, ui)
    req = act.CheckRequest(config, tuple(target or ()), tuple(location or ()), username, password, password_file,
                           openqrm_url)
    _emit("check", act.check(req, Runner(verbose=verbose, log=ui.debug if verbose else None), ui), as_json)


def _command(args: list[str]) -> str | None:
    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    return next((a for a in args if a in names), None)


def _fail(e: QrmfsError, command: str, as_json: bool) -> int:
    """The one place an error is shown: one line (and the failing tool's stderr tail) on stderr, and the
    envelope on stdout with --json."""
    print(f"qrmfs: error: {e.message}", file=sys.stderr)
    if e.detail:
        print("\n".join("  | " + ln for ln in e.detail.splitlines()), file=sys.stderr)
    if as_json:
        print(render_json(command, error=e))
    return e.exit_code


def _usage(e: typer.TyperException, command: str, as_json: bool) -> int:
    """click's own usage errors (a missing or unknown option, a bad value), shown click's way."""
    show = getattr(e, "show", None)
    if show:
        show()
    else:
        print(f"qrmfs: error: {e.format_message()}", file=sys.stderr)
    if as_json:
        print(render_json(command, error=UsageError(e.format_message())))
    return e.exit_code


def _stop_on_signals() -> None:
    """SIGINT and SIGTERM (Ctrl-C, systemd, `timeout`, CI) raise Interrupted where qrmfs is: every step then
    stops what it runs (a storage-side copy first) and removes what it left half-done before qrmfs exits.
    A second signal while that happens is not obeyed: SIGKILL is the way to stop qrmfs at once (its children
    die with it, and the storage side stops the copy when the connection goes)."""
    def handler(signum: int, _frame: object) -> None:
        _only_say_cleaning_up()
        interrupt(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, handler)


def _only_say_cleaning_up() -> None:
    """From now on SIGINT and SIGTERM only say that qrmfs is cleaning up (its run ended or is stopping)."""
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, lambda n, _f: print("qrmfs: still cleaning up; SIGKILL stops at once", file=sys.stderr))


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if argv is None:
        _stop_on_signals()
    rc = _main(args)
    journal.record_cli(args, rc)  # the operation's summary in the system log (journalctl -t qrmfs)
    return rc


def _main(args: list[str]) -> int:
    as_json = "--json" in args
    command = _command(args) or ""
    try:
        rc = app(args=args, prog_name="qrmfs", standalone_mode=False)
        return rc if isinstance(rc, int) else 0
    except typer.Exit as e:
        return e.exit_code
    except typer.TyperException as e:
        return _usage(e, command, as_json)
    except typer.Abort:
        return _fail(AbortedError("aborted"), command, as_json)
    except QrmfsError as e:
        return _fail(e, command, as_json)
    except KeyboardInterrupt:
        print("qrmfs: interrupted", file=sys.stderr)
        return 130


def entry() -> None:
    rc = main()
    # qrmfs's own clean-up (its connections, its ssh-agent) runs now, as at any exit; then the process ends at
    # once, without the interpreter tearing down its objects one by one (0.15 s of a 1.6 s create here). The run
    # has ended: a signal now cannot stop anything, and must not cut the clean-up with a traceback.
    _only_say_cleaning_up()
    atexit._run_exitfuncs()
    for f in (sys.stdout, sys.stderr):
        try:
            f.flush()
        except (OSError, ValueError):
            rc = rc or 1
    os._exit(rc)
