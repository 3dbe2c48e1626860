"""The one way an image comes into being (create and clone) or gets a new generation (update, create
--force of an existing image), as named steps:

    lock -> check the target -> stage -> copy -> prepare -> manifest -> publish -> register

A failure anywhere before publish removes the staging copy: nothing under the image's name, no
registration. Registration after publish goes through the spool, so it is never lost.

A new generation of an existing image is incremental: the staging copy starts as a copy of the current
image (`cp -a --reflink=always` where the file system shares extents, a plain copy otherwise; never hard
links, so each generation stays independent of the others and of what nodes write), then rsync --delete
brings it to the source's state and the preparation runs again. The publish is the agent's journaled swap
(agent/gens.py): node state moves in, the old image becomes the newest generation."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

from .. import __version__, jobs, openqrm
from .. import argv as A
from ..agent import steps
from ..agent.gens import CRASH_ENV
from ..agent.manifest import CHANGE_KINDS, Manifest, generation_id
from ..agent.protocol import FindingRecord, Inspected, Options, Prepared, Published, RebaseScanned, StagedUpdate
from ..agent.tree import siblings
from ..agent.treediff import SCAN_LIMIT, prepared_change
from ..config import SshHost, Storage
from ..errors import ConnectError, ExistsError, QrmfsError, StorageError
from ..model import Route, Target
from ..pending import Pending
from ..results import Built, Registration, RegState
from ..runner import Runner, tail
from ..storage import StorageSide, Supervised, node_init_script
from ..transfer import run_rsync, run_stream
from . import copyplan, exports, hosts, names
from .common import Credentials, Env, holder, kept_for_nodes
from .delivery import claim_job, deliver, iso_now


@dataclass(frozen=True)
class Placement:
    """Where an image lives and how the agent reaches it: on its storage server over ssh, or, for
    `--route nfs`, through the export mounted here (then the agent runs here, on the mount)."""
    target: Target       # as the operator named it
    storage: Storage     # the configured storage server (its name and openQRM id are the image's)
    agent: Storage       # where the agent works on the tree: the server itself, or the local mount
    path: str            # the image's path as the agent sees it

    @property
    def here(self) -> bool:
        return self.agent.ssh.is_local


@contextmanager
def placement(env: Env, target: Target, route: Route = Route.SSH) -> Iterator[Placement]:
    storage = env.storage(target)
    if route is not Route.NFS:
        yield Placement(target, storage, storage, target.path)
        return
    with hosts.nfs_mount(env.runner, storage) as mnt:
        local = Storage(storage.name, SshHost("local"), mnt, storage.storage_id)
        yield Placement(target, storage, local, mnt + target.path[len(storage.export_root):])


def staging_name(target: Target) -> str:
    """The staging directory's name as a plan shows it (the real one ends in a random id)."""
    return siblings(target.path).staging_prefix + "<id>"


def exists_error(target: Target) -> ExistsError:
    return ExistsError(f"{target} exists; use --force to replace it (the old image is kept until the new one is "
                       "published)")


@dataclass(frozen=True)
class Enrollment:
    """The image's openQRM registration: whose server, with which image_* fields."""
    creds: Credentials
    fields: dict[str, str]


@dataclass(frozen=True)
class BuildSpec:
    command: str                      # "create" | "clone"
    place: Placement
    source: copyplan.Source           # what to copy (its mounts are found at run time for a live source)
    source_label: str                 # how the manifest and messages name the source
    options: Options
    force: bool
    enroll: Enrollment | None         # None: not registered (-o)
    manifest: dict[str, Any]          # what the action records (options, excludes, ...); the pipeline adds the rest
    also_lock: tuple[tuple[StorageSide, str], ...] = ()
    discover_mounts: bool = False     # read the source's mount table (create from a live host)
    new_record: bool = True           # register with new_image; False (update): the record stays, events only
    replace_record: bool = False      # a new generation whose record shows options that changed: remove + new
    parent: Manifest | None = None    # the current image's manifest, when a new generation is made
    origin: tuple[str, str] | None = None  # clone: the image copied (path, its export root); on the same server
    #                                        it is copied with cp (reflinks where they work), not rsync

    @property
    def name(self) -> str:
        return self.place.target.name


@dataclass
class Run:
    """One build under way, for the steps that follow the target's check: what it builds and where, and what a
    failure must clean up or report (the staging copy as soon as it exists, the openQRM job). What each step
    makes is its return value, handed to the steps that use it."""
    spec: BuildSpec
    side: StorageSide
    started: float
    job: openqrm.Job | None
    incremental: bool                 # a new generation of the image at the target
    staging: str = ""                 # the staging directory, once made (_stage)


@dataclass(frozen=True)
class Staged:
    """The staging directory and the copies into it: `plan` runs first; `whole`, when the source's mounts were
    still being read (an update), is the whole plan, whose copies beyond `plan`'s run after it."""
    plan: copyplan.CopyPlan
    whole: Pending[copyplan.CopyPlan] | None
    base_copy: dict[str, Any]         # how the staging copy of an image was made (none: a fresh copy)


@dataclass(frozen=True)
class Copied:
    plan: copyplan.CopyPlan           # the whole plan that ran
    runs: list[dict[str, Any]]        # each copy's record (rsync's or the tar stream's), for the manifest


def build(env: Env, spec: BuildSpec) -> Built:
    started = time.time()
    side = env.side(spec.place.agent)
    side.connect()  # the storage server's ssh handshake overlaps the source's (its mount table)
    source = _source(env, spec)  # read from here on, beside what follows
    pinned = Pending.start("the source's known_hosts", lambda: _pin(env, spec, spec.source))  # during the handshakes
    if spec.enroll and spec.enroll.creds.url:  # after both ssh have started: the CPU it takes delays neither
        openqrm.prepare(spec.enroll.creds.url, env.cfg.openqrm.ca_file)
    if spec.enroll and spec.new_record:  # a name openQRM holds for another path: refused before anything is done
        names.check_name_free(env, spec.name, spec.place.target)
    job = _open_job(spec)
    if spec.parent is None:
        # a first copy: a source that cannot be reached fails before anything is touched. A new generation of an
        # image (update) reads the source's mounts while its staging copy is made and its root is copied: only
        # the separate filesystems' copies need them (_stage), and a failure then removes the staging copy.
        source.result()
    pin = pinned.result()  # a source host key we do not know: refused before anything is touched
    with ExitStack() as held:
        _lock(env, side, spec, held)  # the image's lock: held from here to the end of the block
        _warm(side, spec)
        info = side.inspect(spec.place.path)
        _check_target(info, spec)
        incremental = spec.force and info.is_image
        if incremental:
            spec = _as_new_generation(env, spec, info.manifest)
        run = Run(spec, side, started, job, incremental)
        if job and spec.enroll:
            deliver(env, spec.enroll.creds, job, quick=True)  # the "started" event, if openQRM answers now
        try:
            staged = _stage(env, run, source, pin)
            copied = _copy(env, run, staged)
            crash_point("before-prepare")
            prepared, counts = _prepare(env, run)
            manifest = _write_manifest(run, staged, copied, prepared, counts)
            _arm(env, run, manifest)
            crash_point("before-publish")
            published = _publish(env, run)
            crash_point("after-publish")
        except BaseException as e:
            _discard(env, run)
            _report_failure(env, run, e)
            raise
        env.ui.step(f"published {spec.place.target}" + (
            f" (the image it replaced is kept as {published.previous})" if published.replaced else ""))
        # the image's own NFS export: new mounts get this generation; a failure is raised after the registration
        exported = exports.apply(env, env.side(spec.place.storage), spec.place.target,
                                 "refresh" if incremental else "add")
        built = dataclasses.replace(_result(env, run, manifest, prepared, published, _register(env, run)),
                                    export=exports.shown(exported))
        exports.failed(exported)
        return built


def _as_new_generation(env: Env, spec: BuildSpec, current: Manifest | None) -> BuildSpec:
    """An image that exists (update, create --force) gets a new generation, and keeps its openQRM record when it
    has one: the same name and root device, so only the events are sent, unless an option the record shows
    (--shared, -a, --operation-system) changed: then the record is replaced (remove_by_name, new_image), as
    openQRM's update_image needs the record's image_id, which no answer of openQRM shows."""
    keeps = Registration.of_manifest(current).has_record
    changed = jobs.record_fields_changed(current.options if current else {}, spec.manifest.get("options", {}))
    # the manifest read under the lock: a flush before it may have recorded a delivery since the caller read it
    spec = dataclasses.replace(spec, parent=current if current is not None else spec.parent,
                               new_record=spec.new_record and not keeps,
                               replace_record=bool(spec.enroll and keeps and changed))
    if spec.replace_record:
        env.ui.step(f"openQRM's record of {spec.name} is replaced: its {', '.join(changed)} changes")
    return spec


def crash_point(step: str) -> None:
    """Tests: qrmfs gets a signal at the named point, for real: `$QRMFS_TEST_CRASH_AT` = STEP (SIGKILL: its
    children go with it, as after any SIGKILL) or STEP:TERM / STEP:INT (what systemd, `timeout` or Ctrl-C send:
    qrmfs's own handler stops the run there) or STEP:STOP (paused there, holding what it holds, until SIGCONT)."""
    want, _, sig = (os.environ.get(CRASH_ENV) or "").partition(":")
    if want == step:
        os.kill(os.getpid(), {"": signal.SIGKILL, "TERM": signal.SIGTERM, "INT": signal.SIGINT,
                              "STOP": signal.SIGSTOP}[sig])


def _open_job(spec: BuildSpec) -> openqrm.Job | None:
    if not spec.enroll:
        return None
    assert spec.enroll.creds.url
    return jobs.job(spec.enroll.creds.url, spec.enroll.creds.user, spec.command, spec.name, str(spec.place.target),
                    [jobs.started(spec.command, spec.name, str(spec.place.target))])


def _lock(env: Env, side: StorageSide, spec: BuildSpec, held: ExitStack) -> None:
    held.enter_context(env.locked(side, spec.place.path, spec.command, spec.name))
    for other_side, other_path in spec.also_lock:
        held.enter_context(env.locked(other_side, other_path, spec.command, spec.name))


def _check_target(info: Inspected, spec: BuildSpec) -> None:
    if info.exists and not spec.force:
        raise exists_error(spec.place.target)


def _source(env: Env, spec: BuildSpec) -> Pending[copyplan.Source]:
    """The source with what is mounted below it (a live host's separate filesystems), read in the background
    from now on: joining it waits for it (and raises what reading it raised)."""
    if not spec.discover_mounts:
        return Pending.done("the source", spec.source)

    def read() -> copyplan.Source:
        mounts = hosts.discover_mounts(env.runner, env.cfg, spec.source.host, spec.source.path)
        for s in mounts.skipped:
            env.ui.warn(f"not copied: {s['path']} ({s['fstype']}, {s['why']})")
        return dataclasses.replace(spec.source, mounts=mounts)

    return Pending.start("the source's mounts", read)


def _pin(env: Env, spec: BuildSpec, source: copyplan.Source) -> str | None:
    """The source's known_hosts lines, where the storage server logs in to the source itself: they are pinned
    there, so its ssh never trusts a host key blindly."""
    if source.host is None or _hop(spec, source) is not copyplan.Hop.PULL_ON_STORAGE:
        return None
    return hosts.source_known_hosts(env.runner, env.cfg, source.host)


def _warm(side: StorageSide, spec: BuildSpec) -> None:
    """The agent of the copy's first supervised command, started while the lock, staging and plan are made."""
    if side.local:
        return
    hop = _hop(spec, spec.source)
    if hop in (copyplan.Hop.PULL_ON_STORAGE, copyplan.Hop.ON_STORAGE):
        side.warm(forward_agent=hop is copyplan.Hop.PULL_ON_STORAGE)


def _stage(env: Env, run: Run, source: Pending[copyplan.Source], pin: str | None) -> Staged:
    """The staging directory (run.staging from the moment it exists) and its copies from the source. An update's
    first plan is its root's copy only, which does not depend on the source's mounts: it starts while they are
    still being read, and the whole plan follows once they are (the separate filesystems' copies come after)."""
    spec = run.spec
    token = uuid.uuid4().hex[:10]
    if run.incremental:
        up = run.side.stage_update(spec.place.path, token, pin, env.cfg.node_timeout)
        run.staging = up.staging
        base_copy = _copy_image(env, run, spec.place.path, up)
        known_hosts = up.known_hosts
    elif spec.origin is not None and _same_server(spec, spec.source):
        up = run.side.stage_copy(spec.place.path, token, *spec.origin)
        run.staging = up.staging
        base_copy = _copy_image(env, run, spec.origin[0], up)
        nothing_left = copyplan.CopyPlan(copyplan.Hop.ON_STORAGE, (), source.result().mounts)
        return Staged(nothing_left, None, base_copy)
    else:
        staged = run.side.stage(spec.place.path, token, pin)
        run.staging, known_hosts, base_copy = staged.staging, staged.known_hosts, {}
    into = copyplan.Into(spec.place.agent, run.staging, spec.place.here, known_hosts)

    def plan(source: copyplan.Source) -> copyplan.CopyPlan:
        return copyplan.plan(env.cfg, source, into, progress=env.ui.tty, delete=run.incremental,
                             stream=not run.incremental, whole=run.incremental and copyplan.whole_list(spec.parent))

    if not run.incremental:
        return Staged(plan(source.result()), None, base_copy)
    # no mounts known yet: the root's copy alone first
    return Staged(plan(spec.source), source.then("the whole copy plan", plan), base_copy)


def _copy(env: Env, run: Run, staged: Staged) -> Copied:
    """The staged plan's copies, then the rest of the whole plan. A copy that fails while the source's mounts
    could not be read either fails with that reason (cannot reach the source), which says more than rsync's
    exit code. From the spare, the changes are counted against the image by the agent (treediff.op_rebase) once
    every copy is done: it compares the paths that its scan, made while rsync ran, and rsync's own items name
    (the whole trees when they name too many)."""
    spec, plan = run.spec, staged.plan
    recycled = staged.base_copy.get("method") == "recycled"
    prepared = prepared_paths(spec.parent) if run.incremental else frozenset()
    items: list[str] | None = [] if recycled else None
    scan = run.side.start_rebase_scan(spec.place.path, run.staging) if recycled else None

    def copies(cp: copyplan.CopyPlan) -> list[dict[str, Any]]:
        return copy(env, run.side, spec.place.path, cp, holder(spec.command, spec.name), prepared, items=items)

    try:
        runs = copies(plan)
    except QrmfsError:
        if staged.whole is not None:
            staged.whole.result()
        raise
    if staged.whole is not None:
        whole = staged.whole.result()
        done = len(plan.copies)
        assert whole.copies[:done] == plan.copies, "the root's copy does not depend on the mounts"
        runs += copies(dataclasses.replace(whole, copies=whole.copies[done:]))
        plan = whole
    if scan is not None and runs:
        t0 = time.monotonic()
        found = _scanned(scan)
        only = None if found is None or items is None or len(items) > SCAN_LIMIT else {*found, *items}
        counts = run.side.rebase(spec.place.path, run.staging, prepared, only).counts
        runs[0]["changes"] = {k: counts.get(k, 0) for k in CHANGE_KINDS}
        runs[0]["changes_counted"] = {"against": "the image (the copy started from its spare)",
                                      "compared": "every path" if only is None else f"{len(only)} paths",
                                      "seconds": round(time.monotonic() - t0, 3)}
    return Copied(plan, runs)


def _scanned(scan: Pending[RebaseScanned]) -> list[str] | None:
    """The scan's paths; None when it named too many, or failed (the count then walks the whole trees). Its
    refusal (images lie below the image, which an update never replaces) stops the update."""
    try:
        return scan.result().paths
    except StorageError:  # not a RefusedError: that one stops the update
        return None


def _same_server(spec: BuildSpec, source: copyplan.Source) -> bool:
    """The source tree is on the server the image goes to (a clone there): copied there with cp."""
    return _hop(spec, source) in (copyplan.Hop.ON_STORAGE, copyplan.Hop.LOCAL)


def _hop(spec: BuildSpec, source: copyplan.Source) -> copyplan.Hop:
    """How a copy from source into the image's place runs (copyplan.hop)."""
    into = copyplan.Into(spec.place.agent, spec.place.path, spec.place.here)
    return copyplan.hop(None if source.host is None or source.host.is_local else source.host, into)


def _copy_image(env: Env, run: Run, image: str, up: StagedUpdate) -> dict[str, Any]:
    """Copy the image at `image` (without /.qrmfs) into the staging directory: reflinks where the file system
    shares extents, else a plain copy; under the agent's supervision on a storage server, like rsync. What
    ran and how long it took go into the manifest."""
    if up.recycled is not None:
        env.ui.step(f"starting from the image's spare (the generation made {up.recycled.get('made') or '?'}): "
                    "rsync brings it to the source's state")
        return {"method": "recycled", "seconds": 0.0, "entries": 0, "argv": [], "spare": up.recycled}
    method = "reflink" if up.reflink else "copy"
    env.ui.step(f"copying {image} into staging ({method})")
    t0 = time.monotonic()
    cp = A.copy_tree_argv(image, up.entries, up.staging, reflink=up.reflink)
    if up.entries:
        spec = run.spec
        # on a storage server, under the agent's supervision like rsync: it stops when we go or lose the lock
        sup = Supervised(cp) if run.side.local else run.side.supervised(spec.place.path, cp,
                                                                             holder(spec.command, spec.name))
        r = env.runner.stream(sup.argv, lambda _line: None, ok=range(256), input=sup.input,
                              started=sup.started)
        if r.code != 0:
            raise StorageError(f"copying {image} into staging failed ({method}, exit {r.code})", tail(r.stderr))
    return {"method": method, "seconds": round(time.monotonic() - t0, 3), "entries": len(up.entries),
            "argv": list(cp) if up.entries else []}


def _publish(env: Env, run: Run) -> Published:
    spec = run.spec
    if not run.incremental:
        return run.side.publish(spec.place.path, run.staging, spec.force, env.cfg.node_timeout)
    try:
        swapped = run.side.publish_update(spec.place.path, run.staging, env.cfg.keep_generations, env.cfg.spare,
                                          env.cfg.node_timeout)
    except QrmfsError as e:
        e.message += ("; if the publish had begun, the next qrmfs operation on the image finishes it (its node "
                      "state is never left behind)")
        raise
    for f in swapped.prune_failed:
        env.ui.warn(f"an earlier generation could not be deleted (the next operation on the image tries again): {f}")
    kept_for_nodes(env, swapped.held)
    return Published(swapped.path, True, swapped.generation)


def copy(env: Env, side: StorageSide, path: str, cp: copyplan.CopyPlan, holder: str | None,  # noqa: PLR0913 - one copy's inputs
         prepared: frozenset[str] = frozenset(), items: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the plan's copies; those on the storage server under the agent's supervision, tied to our lock.
    A copy with a tar stream runs the stream, and its rsync repair only when the stream was not clean.
    Where rsync itemizes (an update), each run counts its changes by kind, leaving out the paths the
    preparation changes on purpose (`prepared`): they differ from the source in every generation.
    items: the staging copy started from the image's spare (an older tree), so rsync's items say what changed
    since the spare: they are not counted, each itemized path is added to `items` instead (as a path in the
    tree, up to SCAN_LIMIT + 1), and the caller counts against the image."""
    runs = []
    with hosts.agent_for(env.runner, cp, env.cfg.identity_file, env.agent) as agent_env:
        runner = env.runner.with_env(agent_env) if agent_env else env.runner
        for c in cp.copies:
            rsync = c.rsync
            if c.stream is not None:
                rec = _stream(env, runner, side, path, c, holder)
                runs.append(rec)
                if rec["clean"]:
                    continue
                env.ui.warn(f"{c.what}: the tar stream did not end cleanly ({rec['warning']}); rsync repairs the copy")
                rsync = c.stream.repair
            env.ui.step(f"copying {c.what} ({c.runs_on})")
            env.ui.debug("  rsync argv: " + " ".join(rsync))
            sup = side.supervised(path, rsync, holder, c.forward_agent) if c.on_storage else Supervised(rsync)
            t0 = time.monotonic()
            changes: Counter[str] = Counter()

            def count(kind: str, p: str, within: str = c.within, tally: Counter[str] = changes) -> None:
                if items is None:
                    if not prepared_change(kind, within + p, prepared):
                        tally[kind] += 1
                elif len(items) <= SCAN_LIMIT:
                    items.append(within + p)

            with env.ui.transfer(c.what) as progress:
                stats, warning, code = run_rsync(runner, sup.argv, progress, sup.input, count, sup.started)
            if warning:
                env.ui.warn(f"{c.what}: {warning} (rsync exit {code})")
            runs.append({"what": c.what, "runs_on": c.runs_on, "mechanism": "rsync", "argv": list(rsync),
                         "exit_code": code, "warning": warning, "stats": stats,
                         "changes": {k: changes[k] for k in CHANGE_KINDS}, "seconds": round(time.monotonic() - t0, 3)})
    return runs


def _stream(env: Env, runner: Runner, side: StorageSide, path: str, c: copyplan.Copy, holder: str | None
            ) -> dict[str, Any]:
    """One tar stream into the empty staging directory, on the storage server under the agent."""
    assert c.stream is not None
    env.ui.step(f"copying {c.what} ({c.runs_on}, tar stream)")
    env.ui.debug("  tar stream: " + " ".join(c.stream.send) + " | " + " ".join(c.stream.receive))
    sup = side.supervised(path, c.stream.send, holder, c.forward_agent, pipe_to=c.stream.receive)
    t0 = time.monotonic()
    with env.ui.transfer(c.what) as progress:
        s = run_stream(runner, sup.argv, sup.input, progress, sup.started)
    return {"what": c.what, "runs_on": c.runs_on, "mechanism": "tar stream", "argv": list(c.stream.send),
            "pipe_to": list(c.stream.receive), "exit_codes": list(s.codes) if s.codes else [s.code],
            "clean": s.clean, "warning": None if s.clean else s.why(),
            "stats": {} if s.bytes is None else {"bytes_streamed": s.bytes},
            "seconds": round(time.monotonic() - t0, 3)}


def prepared_options(options: Options) -> Options:
    """The options the agent prepares with: with the qrmfs-init script's text (every image gets it)."""
    return dataclasses.replace(options, node_init=node_init_script())


def _prepare(env: Env, run: Run) -> tuple[Prepared, dict[str, int]]:
    """The agent's preparation of the staging copy, and the copy's counts (files, bytes)."""
    spec = run.spec
    env.ui.step("preparing the image for an NFS root")
    prepared = run.side.prepare(spec.place.path, prepared_options(spec.options), root=run.staging)
    if spec.options.regenerates_host_keys:
        _fresh_host_keys(env, run)
    unfixed = [f for f in prepared.left if f.fixable]
    if unfixed:
        raise StorageError("preparation left problems: " + "; ".join(f"{f.path}: {f.problem}" for f in unfixed))
    for f in prepared.left:
        env.ui.warn(f"{f.step}: {f.path}: {f.problem}")
    c = prepared.counts or run.side.stats(spec.place.path, run.staging)  # counted in the preparation's walk
    return prepared, {"files": c.files, "bytes": c.bytes}


def _fresh_host_keys(env: Env, run: Run) -> None:
    """A copy of an image that keeps per-image host keys gets its own, never the original's."""
    script = 'test ! -d "$1/etc/ssh" || ssh-keygen -q -A -f "$1"'
    env.runner.run(run.side.argv(("sh", "-c", script, "sh", run.staging)), timeout=120)


def prepared_paths(manifest: Manifest | None) -> frozenset[str]:
    """Manifest.prepared_paths; none without a manifest."""
    return manifest.prepared_paths if manifest is not None else frozenset()


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _findings(records: list[FindingRecord]) -> list[dict[str, Any]]:
    return [dataclasses.asdict(f) for f in records]


def _write_manifest(run: Run, staged: Staged, copied: Copied, prepared: Prepared, counts: dict[str, int]
                    ) -> Manifest:
    spec, place = run.spec, run.spec.place
    left = prepared.left
    manifest = Manifest.new({
        **spec.manifest,
        "qrmfs_version": __version__, "image": spec.name, "target": str(place.target), "path": place.target.path,
        "storage": place.storage.name, "storage_id": place.storage.storage_id, "source": spec.source_label,
        "created": _iso(run.started), "finished": _iso(time.time()),
        "created_by": holder(spec.command, spec.name), "route": spec.manifest.get("route", Route.SSH.value),
        "copy": copied.plan.hop.value, "rsync": copied.runs,
        "separate_filesystems": copied.plan.mounts.include, "skipped_mounts": copied.plan.mounts.skipped,
        "counts": counts,
        "generation": _generation(run, staged.base_copy, copied.runs, counts),
        "preparation": {"steps": [s.name for s in steps.STEPS], "fixed": _findings(prepared.fixed)},
        "registration": _registration_record(run),
        "validation": {"state": "clean" if not left else "problems", "findings": _findings(left),
                       "time": _iso(time.time())},
    })
    run.side.write_manifest(place.path, run.staging, manifest)
    return manifest


def _registration_record(run: Run) -> dict[str, Any]:
    if run.incremental and not (run.spec.new_record or run.spec.replace_record):
        # a new generation of an image with a record: the record is as it was (its events, if any, are no
        # registration; a new_image still waiting in the spool stays named, so its flush records the delivery)
        return Registration.of_manifest(run.spec.parent).record()
    if run.job:  # until openQRM accepts it: the spool job that carries it is named (flush records the delivery)
        return Registration(RegState.PENDING, run.job.id).record()
    return Registration(RegState.NOT_REGISTERED).record()


def _generation(run: Run, base_copy: dict[str, Any], runs: list[dict[str, Any]], counts: dict[str, int]
                ) -> dict[str, Any]:
    """This generation: its id, the one it replaced, how its tree was made, what changed (rsync's counts)."""
    parent = generation_id(run.spec.parent) if run.incremental else None
    if run.incremental:
        changes = {k: sum(r.get("changes", {}).get(k, 0) for r in runs) for k in CHANGE_KINDS}
    else:  # a fresh copy: everything is new
        changes = {"new": counts.get("files", 0)}
    changes["bytes_transferred"] = sum(r.get("stats", {}).get("bytes_transferred", 0)
                                       + r.get("stats", {}).get("bytes_streamed", 0) for r in runs)
    return {"id": uuid.uuid4().hex, "made_by": run.spec.command, "parent": parent,
            "base_copy": base_copy or {"method": "none (a fresh copy)"},
            "changes": changes}


def _discard(env: Env, run: Run) -> None:
    """Remove the unfinished copy (its rsync has stopped by now: Runner.stream waits for it)."""
    if not run.staging:
        return
    try:
        try:
            run.side.discard(run.spec.place.path, run.staging)
        except ConnectError:  # the connection that failed the copy was still in use: once more, on a new one
            run.side.discard(run.spec.place.path, run.staging)
        env.ui.step(f"removed the unfinished copy {run.staging}")
    except QrmfsError as e:
        env.ui.warn(f"could not remove the unfinished copy {run.staging} ({e.message}); the next qrmfs run on "
                    "this image removes it, under the image's lock")


def _records(run: Run) -> list[openqrm.Request]:
    """What registers the image, and the "finished" event. A new record only for an image that had none: a
    generation of a registered image keeps its record, and an earlier generation without one leaves nothing to
    remove (remove_by_name would hit the record of another path's image of that name)."""
    spec = run.spec
    assert spec.enroll
    fields = spec.enroll.fields if spec.new_record or spec.replace_record else None
    return jobs.closing(spec.command, spec.name, str(spec.place.target), fields, spec.replace_record)


def _arm(env: Env, run: Run, manifest: Manifest) -> None:
    """Write-ahead, before the publish: the registration goes into the spool, bound to the generation being
    published and claimed by this process. Killed at the publish or after it, the next flush sends it once the
    image is there, or drops it (reporting the failure) when the publish never happened."""
    spec, job = run.spec, run.job
    if not (job and spec.enroll):
        return
    job.requests += _records(run)
    job.publish = {"generation": manifest.generation_id}
    claim_job(env, job)
    env.spool().save(job)


def _report_failure(env: Env, run: Run, e: BaseException) -> None:
    spec = run.spec
    if not (run.job and spec.enroll):
        return
    if run.job.publish is not None:
        if _maybe_published(run):  # the publish failed late, or we cannot tell: the next flush decides
            env.spool().save(run.job)
            env.ui.warn(f"{spec.place.target} may have been published all the same: its registration waits in the "
                        f"spool (job {run.job.id}); `qrmfs flush` sends it once the image is confirmed there, or "
                        "reports the failure if it is not")
            return
        # armed, but surely not published: nothing of the registration may be sent
        run.job.publish = None
    jobs.abandon(run.job, e.message if isinstance(e, QrmfsError) else type(e).__name__)
    deliver(env, spec.enroll.creds, run.job, quick=True)


def _maybe_published(run: Run) -> bool:
    """After a failure with the registration armed: is the image at the target the generation being
    published (or can we not tell, the storage server gone)?"""
    assert run.job is not None and run.job.publish is not None
    try:
        manifest = run.side.inspect(run.spec.place.path).manifest
    except QrmfsError:
        return True
    return generation_id(manifest) == run.job.publish["generation"]


def _register(env: Env, run: Run) -> Registration:
    """Deliver the registration with retries; if the server stays away, it waits in the spool. An update
    keeps the image's openQRM record as it is (same name, same path: its fields do not change), so it sends
    only the events: openQRM's update_image needs an image_id, which qrmfs cannot learn."""
    spec, job = run.spec, run.job
    if not (job and spec.enroll):
        return Registration(RegState.NOT_REGISTERED)
    if job.publish is None:
        job.requests += _records(run)
    job.publish = None  # published: from now on it may be sent
    crash_point("register")
    saw = jobs.seen(job.requests)
    try:
        why = deliver(env, spec.enroll.creds, job)
    except QrmfsError as e:
        _record(run, Registration(RegState.PENDING, job.id, e.message))
        e.message += (f"; the image is created and its registration waits in the spool (job {job.id}): "
                      "fix the cause and run `qrmfs flush`")
        raise
    if not (spec.new_record or spec.replace_record):  # a new generation sent only its events: the record stays
        reg = Registration.of_manifest(spec.parent)
        if why is None:
            env.ui.step(f"sent {spec.name}'s events to openQRM at {spec.enroll.creds.url}: {saw}")
        else:
            env.ui.warn(f"openQRM did not answer ({why}): the {spec.command}'s events wait in the spool")
    elif why is None:
        reg = Registration(RegState.SENT, time=iso_now(), via=spec.command, seen=saw)
        env.ui.step(f"sent {spec.name}'s registration to openQRM at {spec.enroll.creds.url}: {saw}")
    else:
        reg = Registration(RegState.PENDING, job.id)
        env.ui.warn(f"openQRM did not answer ({why}): the image is created and its registration waits in the "
                    f"spool ({env.spool().dir / (job.id + '.json')}); it is delivered automatically at the next "
                    "qrmfs run, or now with `qrmfs flush`")
    _record(run, reg)
    return reg


def _record(run: Run, reg: Registration) -> None:
    run.side.manifest_update(run.spec.place.path, {"registration": reg.record()})


def _result(env: Env, run: Run, m: Manifest, prepared: Prepared, published: Published,
            reg: Registration) -> Built:
    spec = run.spec
    return Built(command=spec.command, image=spec.name, target=str(spec.place.target), source=spec.source_label,
                 route=m.route or Route.SSH.value, files=m.files or 0, bytes=m.bytes or 0,
                 replaced=published.replaced, previous=published.previous,
                 preparation_fixed=len(prepared.fixed), validation=m.validation_state,
                 registration=reg, warnings=list(env.ui.warnings),
                 changes=dict(m.changes or {}))
