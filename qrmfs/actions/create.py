"""qrmfs create: copy a root filesystem into a staging dir beside the target, prepare it, write its manifest,
publish it by rename, then register it with openQRM (or spool the registration)."""

from __future__ import annotations

import dataclasses
import time
import uuid
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

from .. import __version__, openqrm
from ..agent import steps
from ..config import SshHost, Storage
from ..errors import ExistsError, QrmfsError, StorageError
from ..model import Location, Target
from ..storage import StorageSide, node_init_script
from ..transfer import run_rsync
from . import copyplan
from .common import Credentials, Env, flush_spool, holder, require_registration


@dataclass(frozen=True)
class CreateRequest:
    name: str
    target: Target
    location: Location
    only_physical: bool = False
    excludes: tuple[str, ...] = ()
    private_add: tuple[str, ...] = ()
    private_exclude: tuple[str, ...] = ()
    arch: str | None = None
    os_name: str | None = None
    keep_services: bool = True
    keep_network: bool = False
    hostname: str | None = None
    shared: bool = False
    force: bool = False
    route: str = "ssh"
    comment: str | None = None
    creds: Credentials = field(default_factory=lambda: Credentials(None, None))

    def prepare_options(self) -> steps.Options:
        return steps.Options(image=self.name, shared=self.shared, private_add=list(self.private_add),
                             private_exclude=list(self.private_exclude), excludes=list(self.excludes),
                             keep_services=self.keep_services, keep_network=self.keep_network,
                             hostname=self.hostname)

    def options_record(self) -> dict[str, Any]:
        o = dataclasses.asdict(self.prepare_options())
        o.pop("node_init")
        o.update(arch=self.arch, os=self.os_name, only_physical=self.only_physical, route=self.route)
        return o


def registration_requests(req: CreateRequest, storage: Storage, replaced: bool) -> list[openqrm.Request]:
    fields = openqrm.image_fields(
        name=req.name, rootdevice=req.target.path, storage_id=storage.storage_id, shared=req.shared,
        comment=req.comment or f"qrmfs image from {req.location}", arch=req.arch, os_name=req.os_name)
    out = [openqrm.remove_by_name(req.name)] if replaced else []
    return [*out, openqrm.new_image(fields),
            openqrm.event(f"create_image_{req.name}", 10, f"Finished to create image {req.name} on {req.target}")]


def dry_run(req: CreateRequest, env: Env) -> dict[str, Any]:
    """The plan, computed without contacting any host."""
    storage = env.storage(req.target)
    staging = f"{req.target.parent}/.{req.name}.qrmfs-staging-<id>"
    cp = copyplan.plan(env.cfg, storage, req.location, staging, list(req.excludes), copyplan.Mounts(),
                       route=req.route, progress=False, storage_known_hosts=f"{req.target.parent}/.{req.name}"
                       ".qrmfs-known_hosts")
    regs = [] if req.only_physical else [
        openqrm.event(f"create_image_{req.name}", 9, f"Started to create image {req.name} on {req.target}"),
        *registration_requests(req, storage, replaced=False)]
    return {
        "dry_run": True, "image": req.name, "target": str(req.target), "source": str(req.location),
        "route": req.route, "staging": staging, "copies": cp.describe(),
        "note": "separate filesystems mounted below the source root are detected at run time and copied too",
        "preparation": [{"step": s.name, "what": s.what} for s in steps.STEPS],
        "options": req.options_record(),
        "registration": [{"url": (req.creds.url or "?") + r.path, "params": r.params} for r in regs],
    }


def create(req: CreateRequest, env: Env) -> dict[str, Any]:
    storage = env.storage(req.target)
    if not req.only_physical:
        require_registration(req.creds)
        flush_spool(env, req.creds, quick=True)
    if req.route == "nfs":
        copyplan.check_nfs_route()
        with copyplan.nfs_mount(env.runner, storage) as mnt:
            local = Storage(storage.name, SshHost("local"), mnt, storage.storage_id)
            inner = dataclasses.replace(req, target=Target("local", mnt + req.target.path[len(storage.export_root):]))
            result = _create(inner, env, local, public_storage=storage, public_target=req.target)
            return result
    return _create(req, env, storage, public_storage=storage, public_target=req.target)


def _create(req: CreateRequest, env: Env, storage: Storage, *, public_storage: Storage,
            public_target: Target) -> dict[str, Any]:
    ui = env.ui
    side = env.side(storage)
    path = req.target.path
    info = side.call("inspect", path=path, export_root=storage.export_root)
    if info["exists"] and not req.force:
        raise ExistsError(f"{public_target} exists; use --force to replace it (the old image is kept until the "
                          "new one is published)")
    mounts = copyplan.discover_mounts(env.runner, env.cfg, req.location)
    for s in mounts.skipped:
        ui.warn(f"not copied: {s['path']} ({s['fstype']}, {s['why']})")
    started = time.time()
    job = None
    if not req.only_physical:
        assert req.creds.url
        job = openqrm.Job(req.creds.url, req.creds.user, req.name, str(public_target), [
            openqrm.event(f"create_image_{req.name}", 9, f"Started to create image {req.name} on {public_target}")])
    with side.lock(path, holder("create", req.name)):
        info = side.call("inspect", path=path, export_root=storage.export_root)
        if info["exists"] and not req.force:
            raise ExistsError(f"{public_target} exists; use --force to replace it")
        if job:
            _deliver(env, req.creds, job, quick=True)
        src = copyplan.source_host(env.cfg, req.location)
        pull = src is not None and not storage.ssh.is_local
        kh = copyplan.source_known_hosts(env.runner, env.cfg, src) if pull and src else None
        st = side.call("stage", path=path, export_root=storage.export_root, token=uuid.uuid4().hex[:10],
                       known_hosts=kh)
        staging = st["staging"]
        try:
            cp = copyplan.plan(env.cfg, storage, req.location, staging, list(req.excludes), mounts,
                               route=req.route, progress=ui.tty, storage_known_hosts=st.get("known_hosts"))
            runs = _copy(env, side, cp)
            ui.step("preparing the image for an NFS root")
            opts = dataclasses.replace(req.prepare_options(),
                                       node_init=node_init_script() if req.shared or req.private_add else "")
            prepared = side.call("prepare", root=staging, options=dataclasses.asdict(opts))
            if prepared["left"]:
                left = "; ".join(f"{f['path']}: {f['problem']}" for f in prepared["left"])
                raise StorageError(f"preparation left problems it cannot fix: {left}")
            counts = side.call("stats", root=staging)
            manifest = _manifest(req, public_storage, public_target, cp, runs, prepared, counts, started,
                                 registration="not registered (-o)" if req.only_physical else "pending")
            side.call("write_manifest", root=staging, manifest=manifest)
            pub = side.call("publish", path=path, export_root=storage.export_root, staging=staging, force=req.force)
        except BaseException as e:
            _discard(side, path, storage, staging)
            if job:
                msg = e.message if isinstance(e, QrmfsError) else type(e).__name__
                job.requests += [openqrm.event(f"create_image_{req.name}", 3, f"Failed to create image {req.name} "
                                               f"on {public_target}: {msg}"),
                                 openqrm.event(f"create_image_{req.name}", 10, f"Ended create image {req.name}")]
                _deliver(env, req.creds, job, quick=True)
            raise
    ui.step(f"published {public_target}" + (" (previous image kept as " + pub["previous"] + ")"
                                            if pub["replaced"] else ""))
    result: dict[str, Any] = {"image": req.name, "target": str(public_target), "source": str(req.location),
                              "route": cp.route, "files": counts["files"], "bytes": counts["bytes"],
                              "replaced": pub["replaced"], "warnings": ui.warnings,
                              "preparation_fixed": len(prepared["fixed"])}
    if job:
        job.requests += registration_requests(req, public_storage, replaced=pub["replaced"])
        result["registration"] = _register(env, req, side, storage, path, job)
    else:
        result["registration"] = {"state": "not registered (-o)"}
    return result


def _copy(env: Env, side: StorageSide, cp: copyplan.CopyPlan) -> list[dict[str, Any]]:
    runs = []
    agent = copyplan.ssh_agent(env.runner, env.cfg.identity_file) if cp.needs_agent else nullcontext({})
    with agent as agent_env:
        runner = env.runner.with_env(agent_env) if agent_env else env.runner
        for c in cp.copies:
            env.ui.step(f"copying {c.what} ({c.runs_on})")
            env.ui.debug("  rsync argv: " + " ".join(c.rsync))
            with env.ui.transfer(c.what) as progress:
                stats, warning, code = run_rsync(runner, c.run, progress)
            if warning:
                env.ui.warn(f"{c.what}: {warning} (rsync exit {code})")
            runs.append({"what": c.what, "runs_on": c.runs_on, "argv": list(c.rsync), "exit_code": code,
                         "warning": warning, "stats": stats})
    return runs


def _discard(side: StorageSide, path: str, storage: Storage, staging: str) -> None:
    try:
        side.call("discard", path=path, export_root=storage.export_root, staging=staging)
    except QrmfsError:
        pass  # the lock is still ours; the next run for this image removes leftover staging dirs


def _manifest(req: CreateRequest, storage: Storage, target: Target, cp: copyplan.CopyPlan,
              runs: list[dict[str, Any]], prepared: dict[str, Any], counts: dict[str, int], started: float,
              registration: str) -> dict[str, Any]:
    from .common import holder as _holder
    return {
        "qrmfs_version": __version__,
        "image": req.name,
        "target": str(target),
        "path": target.path,
        "storage": storage.name,
        "storage_id": storage.storage_id,
        "source": str(req.location),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "created_by": _holder("create", req.name),
        "options": req.options_record(),
        "route": cp.route,
        "rsync": runs,
        "excludes": list(req.excludes),
        "separate_filesystems": cp.mounts.include,
        "skipped_mounts": cp.mounts.skipped,
        "counts": counts,
        "preparation": {"steps": [s.name for s in steps.STEPS], "fixed": prepared["fixed"]},
        "registration": {"state": registration},
        "validation": {"state": "clean", "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
    }


def _deliver(env: Env, creds: Credentials, job: openqrm.Job, quick: bool) -> bool:
    try:
        env.client(creds, quick=quick).deliver(job, env.spool())
        return True
    except openqrm.Transient as e:
        env.ui.debug(f"openQRM not reachable now ({e}); kept in the spool")
        return False


def _register(env: Env, req: CreateRequest, side: StorageSide, storage: Storage, path: str,
              job: openqrm.Job) -> dict[str, Any]:
    """Deliver the registration with retries; if the server stays away, it waits in the spool."""
    try:
        env.client(req.creds).deliver(job, env.spool())
        state = {"state": "registered"}
        env.ui.step(f"registered {req.name} with openQRM at {req.creds.url}")
    except openqrm.Transient as e:
        state = {"state": "pending", "spool_job": job.id}
        env.ui.warn(f"openQRM did not answer ({e}): the image is created and its registration waits in the spool "
                    f"({env.spool().dir / (job.id + '.json')}); it is delivered automatically at the next qrmfs "
                    "run, or now with `qrmfs flush`")
    except QrmfsError as e:
        side.call("manifest_update", path=path, export_root=storage.export_root,
                  patch={"registration": {"state": "pending", "spool_job": job.id, "error": e.message}})
        e.message += f" — the image is created; its registration waits in the spool (job {job.id}): fix and run " \
                     "`qrmfs flush`"
        raise
    side.call("manifest_update", path=path, export_root=storage.export_root, patch={"registration": state})
    return state
