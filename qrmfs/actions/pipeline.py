"""The one way an image comes into being (create and clone): lock, stage, copy, prepare, manifest, publish,
register. A failure anywhere before publish removes the staging copy: nothing under the image's name, no
registration. Registration after publish goes through the spool, so it is never lost."""

from __future__ import annotations

import dataclasses
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

from .. import __version__, openqrm
from ..agent import steps
from ..config import Storage
from ..errors import ExistsError, QrmfsError, StorageError
from ..model import Target
from ..storage import StorageSide, node_init_script
from ..transfer import run_rsync
from . import copyplan
from .common import Credentials, Env, deliver, holder


@dataclass
class BuildSpec:
    command: str                      # "create" | "clone"
    name: str
    target: Target                    # as the operator named it
    storage: Storage                  # where the agent works (the NFS mount for --route nfs)
    path: str                         # the image path as the agent sees it
    public_storage: Storage
    force: bool
    options: steps.Options
    plan_copy: Callable[[str, str | None], copyplan.CopyPlan]  # (staging, storage-side known_hosts) -> plan
    creds: Credentials | None         # None: not registered (-o)
    fields: dict[str, str]            # new_image's image_* parameters
    manifest: dict[str, Any]          # source, options, ... (the pipeline adds what it measured)
    known_hosts: str | None = None    # to pin the source's key on the storage side (pull route)
    also_lock: list[tuple[StorageSide, str]] = field(default_factory=list)
    after_prepare: Callable[[StorageSide, str], None] | None = None


def _event(spec: BuildSpec, priority: int, text: str) -> openqrm.Request:
    return openqrm.event(f"{spec.command}_image_{spec.name}", priority, text)


def build(env: Env, spec: BuildSpec) -> dict[str, Any]:
    ui = env.ui
    side = env.side(spec.storage)
    started = time.time()
    job = None
    if spec.creds:
        assert spec.creds.url
        job = openqrm.Job(spec.creds.url, spec.creds.user, spec.name, str(spec.target), [
            _event(spec, 9, f"Started to {spec.command} image {spec.name} on {spec.target}")])
    with ExitStack() as locks:
        locks.enter_context(side.lock(spec.path, holder(spec.command, spec.name)))
        for other_side, other_path in spec.also_lock:
            locks.enter_context(other_side.lock(other_path, holder(spec.command, spec.name)))
        info = side.call("inspect", path=spec.path, export_root=spec.storage.export_root)
        if info["exists"] and not spec.force:
            raise ExistsError(f"{spec.target} exists; use --force to replace it (the old image is kept until the "
                              "new one is published)")
        if job and spec.creds:
            deliver(env, spec.creds, job, quick=True)
        st = side.call("stage", path=spec.path, export_root=spec.storage.export_root, token=uuid.uuid4().hex[:10],
                       known_hosts=spec.known_hosts)
        staging = st["staging"]
        try:
            cp = spec.plan_copy(staging, st.get("known_hosts"))
            runs = copy(env, cp)
            ui.step("preparing the image for an NFS root")
            opts = spec.options
            if opts.shared or opts.private_add:
                opts = dataclasses.replace(opts, node_init=node_init_script())
            prepared = side.call("prepare", root=staging, options=dataclasses.asdict(opts))
            if spec.after_prepare:
                spec.after_prepare(side, staging)
            unfixed = [f for f in prepared["left"] if f["fixable"]]
            if unfixed:
                raise StorageError("preparation left problems: " +
                                   "; ".join(f"{f['path']}: {f['problem']}" for f in unfixed))
            for f in prepared["left"]:
                ui.warn(f"{f['step']}: {f['path']}: {f['problem']}")
            counts = side.call("stats", root=staging)
            manifest = {
                **spec.manifest,
                "qrmfs_version": __version__, "image": spec.name, "target": str(spec.target),
                "path": spec.target.path, "storage": spec.public_storage.name,
                "storage_id": spec.public_storage.storage_id,
                "created": _iso(started), "finished": _iso(time.time()),
                "created_by": holder(spec.command, spec.name), "route": cp.route, "rsync": runs,
                "separate_filesystems": cp.mounts.include, "skipped_mounts": cp.mounts.skipped,
                "counts": counts,
                "preparation": {"steps": [s.name for s in steps.STEPS], "fixed": prepared["fixed"]},
                "registration": {"state": "pending" if job else "not registered (-o)"},
                "validation": {"state": "clean" if not prepared["left"] else "problems",
                               "findings": prepared["left"], "time": _iso(time.time())},
            }
            side.call("write_manifest", root=staging, manifest=manifest)
            pub = side.call("publish", path=spec.path, export_root=spec.storage.export_root, staging=staging,
                            force=spec.force)
        except BaseException as e:
            _discard(side, spec, staging)
            if job and spec.creds:
                msg = e.message if isinstance(e, QrmfsError) else type(e).__name__
                job.requests += [_event(spec, 3, f"Failed to {spec.command} image {spec.name}: {msg}"),
                                 _event(spec, 10, f"Ended {spec.command} image {spec.name}")]
                deliver(env, spec.creds, job, quick=True)
            raise
        ui.step(f"published {spec.target}" +
                (f" (the image it replaced is kept as {pub['previous']})" if pub["replaced"] else ""))
        result: dict[str, Any] = {"image": spec.name, "target": str(spec.target), "source": spec.manifest["source"],
                                  "route": cp.route, "files": counts["files"], "bytes": counts["bytes"],
                                  "replaced": pub["replaced"], "warnings": ui.warnings,
                                  "preparation_fixed": len(prepared["fixed"]),
                                  "validation": manifest["validation"]["state"]}
        if job and spec.creds:
            job.requests += ([openqrm.remove_by_name(spec.name)] if pub["replaced"] else []) + [
                openqrm.new_image(spec.fields),
                _event(spec, 10, f"Finished to {spec.command} image {spec.name} on {spec.target}")]
            result["registration"] = _register(env, spec, side, job)
        else:
            result["registration"] = {"state": "not registered (-o)"}
    return result


def copy(env: Env, cp: copyplan.CopyPlan) -> list[dict[str, Any]]:
    runs = []
    with copyplan.agent_for(env.runner, cp, env.cfg.identity_file) as agent_env:
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


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def _discard(side: StorageSide, spec: BuildSpec, staging: str) -> None:
    try:
        side.call("discard", path=spec.path, export_root=spec.storage.export_root, staging=staging)
    except QrmfsError:
        pass  # we still hold the lock; the next run for this image removes leftover staging dirs first


def _register(env: Env, spec: BuildSpec, side: StorageSide, job: openqrm.Job) -> dict[str, Any]:
    """Deliver the registration with retries; if the server stays away, it waits in the spool."""
    assert spec.creds
    root = spec.storage.export_root
    try:
        why = deliver(env, spec.creds, job)
    except QrmfsError as e:
        side.call("manifest_update", path=spec.path, export_root=root,
                  patch={"registration": {"state": "pending", "spool_job": job.id, "error": e.message}})
        e.message += (f"; the image is created and its registration waits in the spool (job {job.id}): "
                      "fix the cause and run `qrmfs flush`")
        raise
    if why is None:
        state: dict[str, Any] = {"state": "registered"}
        env.ui.step(f"registered {spec.name} with openQRM at {spec.creds.url}")
    else:
        state = {"state": "pending", "spool_job": job.id}
        env.ui.warn(f"openQRM did not answer ({why}): the image is created and its registration waits in the "
                    f"spool ({env.spool().dir / (job.id + '.json')}); it is delivered automatically at the next "
                    "qrmfs run, or now with `qrmfs flush`")
    side.call("manifest_update", path=spec.path, export_root=root, patch={"registration": state})
    return state
