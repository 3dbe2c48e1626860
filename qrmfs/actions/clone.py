"""qrmfs clone: a new image from an existing one. On the same storage server the copy runs there (no image
data through this machine); across servers the target server pulls from the source server."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from .. import argv as A
from .. import jobs
from ..agent import steps
from ..agent.manifest import Manifest
from ..agent.protocol import Options
from ..agent.tree import PIN_DIR, pin_file
from ..config import Storage
from ..errors import NotFoundError, UsageError
from ..model import Target
from ..results import BuildPlan, Built
from ..storage import StorageSide
from . import copyplan, pipeline
from .common import Credentials, Env, require_registration
from .delivery import flush_spool

CLONE_EXCLUDES = ("/.qrmfs",)  # the old manifest and the old image's per-node state


@dataclass(frozen=True)
class CloneRequest:
    name: str
    target: Target
    source: Target
    only_physical: bool = False
    force: bool = False
    hostname: str | None = None
    creds: Credentials = field(default_factory=lambda: Credentials(None, None))


@dataclass(frozen=True)
class Origin:
    """The image cloned from: its server, its agent, its manifest."""
    storage: Storage
    side: StorageSide
    manifest: Manifest

    def source(self, path: str) -> copyplan.Source:
        return copyplan.Source(self.storage.ssh, path, CLONE_EXCLUDES, live_root=False)


def _origin(req: CloneRequest, env: Env) -> Origin:
    if req.target.path == req.source.path and req.target.storage == req.source.storage:
        raise UsageError("clone target and --from are the same image")
    env.storage(req.target)
    storage, side, info = env.existing(req.source)
    if info.manifest is None:
        raise NotFoundError(f"{req.source} is not a qrmfs image ({info.not_image_because})")
    return Origin(storage, side, info.manifest)


def _options(req: CloneRequest, origin: Origin) -> Options:
    o = Options.from_dict(origin.manifest.options)
    return dataclasses.replace(o, image=req.name, hostname=req.hostname, fresh_identity=True)


def _fields(req: CloneRequest, opts: Options, origin: Origin, env: Env) -> dict[str, str]:
    m = origin.manifest
    return jobs.image_fields(env.cfg.openqrm, env.storage(req.target), name=req.name, rootdevice=req.target.path,
                             shared=opts.shared, comment=f"qrmfs clone of {req.source}", arch=m.option("arch"),
                             os_name=m.option("os"))


def dry_run(req: CloneRequest, env: Env) -> BuildPlan:
    origin = _origin(req, env)
    storage = env.storage(req.target)
    into = copyplan.Into(storage, pipeline.staging_name(req.target), storage.ssh.is_local,
                         pin_file(req.target.path, PIN_DIR))
    src = origin.source(req.source.path)
    cp = copyplan.plan(env.cfg, src, into, stream=True)
    copies, note = cp.describe(), ""
    if cp.hop in (copyplan.Hop.ON_STORAGE, copyplan.Hop.LOCAL):  # the pipeline copies it with cp (same server)
        argv = A.copy_tree_argv(req.source.path, ["<entry>", "..."], into.path, reflink=True)
        copies = [{"what": "the image's top-level entries but .qrmfs",
                   "runs_on": f"storage {storage.name} (local copy)", "argv": list(argv)}]
        note = ("--reflink=always where the staging directory's file system shares extents and is the original's, "
                "else --reflink=auto (a copy through the kernel's copy_file_range)")
    opts = _options(req, origin)
    return BuildPlan(
        command="clone", image=req.name, target=str(req.target), source=str(req.source), route="ssh",
        staging=into.path, copies=copies, note=note,
        preparation=[{"step": s.name, "what": s.what} for s in steps.STEPS],
        options=dataclasses.asdict(opts) | {"node_init": None},
        registration=[] if req.only_physical else jobs.planned(req.creds.url, jobs.requests(
            "clone", req.name, str(req.target), _fields(req, opts, origin, env))))


def clone(req: CloneRequest, env: Env) -> Built:
    origin = _origin(req, env)
    opts = _options(req, origin)
    fields = None
    if not req.only_physical:
        require_registration(req.creds)
        fields = _fields(req, opts, origin, env)  # a record openQRM could not use: refused before anything is done
        flush_spool(env, req.creds, quick=True)
    m = origin.manifest
    with pipeline.placement(env, req.target) as place:
        spec = pipeline.BuildSpec(
            command="clone", place=place, source=origin.source(req.source.path), source_label=f"clone of {req.source}",
            options=opts, force=req.force,
            enroll=None if fields is None else pipeline.Enrollment(req.creds, fields),
            manifest={"cloned_from": {"target": str(req.source), "source": m.source, "created": m.created},
                      "options": {**m.options, "image": req.name, "hostname": req.hostname},
                      "excludes": m.excludes},
            also_lock=((origin.side, req.source.path),), origin=(req.source.path, origin.storage.export_root))
        return pipeline.build(env, spec)
