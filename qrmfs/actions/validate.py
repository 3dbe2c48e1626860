"""qrmfs validate [--fix]: every preparation step's check on an existing image, what a bootable NFS root
needs, the manifest's consistency; --fix applies the same fixes create applies, then checks again.
With -l, the drift between image and source (rsync's dry-run itemized list), changing nothing."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ..agent.manifest import PATH as manifest_path
from ..agent.manifest import Manifest
from ..agent.protocol import Checked, FindingRecord, Options
from ..agent.treediff import prepared_change
from ..config import Storage
from ..model import Location, Target
from ..pending import Pending
from ..results import Drift, Validated
from ..runner import Result
from ..storage import StorageSide, Supervised
from ..transfer import change_kind, check_rsync, parse_item
from . import copyplan, exports, hosts
from .common import Env
from .pipeline import prepared_options, prepared_paths

DRIFT_SHOWN = 200
MANIFEST = "/" + manifest_path


@dataclass(frozen=True)
class ValidateRequest:
    target: Target
    fix: bool = False
    dry_run: bool = False  # with fix: report what --fix would repair, change nothing
    location: Location | None = None


def _manifest_findings(req: ValidateRequest, manifest: Manifest | None) -> list[FindingRecord]:
    if manifest is None:
        return [FindingRecord("manifest", MANIFEST, "missing: not made by qrmfs, or damaged (remove and create again)",
                              False)]
    out = []
    for key, have, want in (("image", manifest.image, req.target.name), ("path", manifest.path, req.target.path)):
        if have != want:
            out.append(FindingRecord("manifest", MANIFEST, f"{key} is {have!r}, the tree is {want!r}", True))
    for key in ("options", "rsync", "counts", "source"):
        if not manifest.has(key):
            out.append(FindingRecord("manifest", MANIFEST, f"has no {key!r}", False))
    return out


def options_of(name: str, manifest: Manifest | None) -> Options:
    """The options an image was prepared with. Without a manifest they are unknown: check and fix only what holds
    for every image (keep its network configuration and services as they are)."""
    known = manifest.options if manifest else {"keep_network": True, "keep_services": True}
    return prepared_options(Options.from_dict({**known, "image": name}))


def validate(req: ValidateRequest, env: Env) -> Validated:
    if req.location is not None and req.location.host is not None:
        env.forward_agent()  # the drift check's rsync runs on the storage server and logs in to the source
    storage, side, info = env.existing(req.target)
    if req.location is None:
        return _validate(req, env, info.manifest)
    if req.fix:
        result = _validate(req, env, info.manifest)
        return dataclasses.replace(result, drift=_drift(env, req, storage, info.manifest))
    # read-only: the agent checks the image while rsync's dry run compares it with the source
    checks: list[Pending[Checked]] = []
    opts = options_of(req.target.name, info.manifest)
    drift = _drift(env, req, storage, info.manifest,
                   alongside=lambda: checks.append(side.start_check(req.target.path, opts)))
    findings = (_manifest_findings(req, info.manifest) + checks[0].result().findings
                + exports.findings(side, req.target.path))
    return Validated(req.target.name, str(req.target), findings, drift=drift)


def _validate(req: ValidateRequest, env: Env, manifest: Manifest | None) -> Validated:
    side = env.side(env.storage(req.target))
    opts = options_of(req.target.name, manifest)
    path = req.target.path

    def findings(m: Manifest | None) -> list[FindingRecord]:
        return _manifest_findings(req, m) + side.check(path, opts).findings + exports.findings(side, path)

    before = findings(manifest)
    if not req.fix:
        return Validated(req.target.name, str(req.target), before)
    if req.dry_run:
        return Validated(req.target.name, str(req.target), before, fix=True, dry_run=True,
                         would_fix=[f for f in before if f.fixable])
    fixed: list[FindingRecord] = []
    after = before
    with env.locked(side, path, "validate --fix", req.target.name):
        if before:
            # the tree itself only when a step has something to fix (the agent refuses it while nodes run it)
            in_tree = any(f.fixable and f.step not in ("manifest", "export") for f in before)
            fixed = (side.prepare(path, opts, node_timeout=env.cfg.node_timeout).fixed if in_tree else []) + [
                f for f in before if f.step in ("manifest", "export") and f.fixable]
            if any(f.step == "export" for f in before):
                side.export(path, "refresh")
            if manifest is not None:
                manifest = side.manifest_update(path, {"image": req.target.name, "path": path}).manifest
            after = findings(manifest)
        if manifest is not None:
            side.manifest_update(path, {"validation": {
                "state": "clean" if not after else "problems", "findings": [dataclasses.asdict(f) for f in after],
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
    return Validated(req.target.name, str(req.target), after, fix=True, fixed=fixed, findings_before_fix=before)


def _drift(env: Env, req: ValidateRequest, storage: Storage, manifest: Manifest | None,
           alongside: Callable[[], object] | None = None) -> Drift:
    """What differs between the source now and the image."""
    assert req.location is not None
    excludes = manifest.excludes if manifest else []
    changes = changes_from_source(env, storage, req.target, req.location, excludes, manifest, alongside)
    return Drift(str(req.location), len(changes), changes[:DRIFT_SHOWN], len(changes) > DRIFT_SHOWN)


def changes_from_source(env: Env, storage: Storage, target: Target, location: Location,  # noqa: PLR0913
                        excludes: Sequence[str], manifest: Manifest | None,
                        alongside: Callable[[], object] | None = None) -> list[dict[str, str]]:
    """What rsync would change in the image to make it the source now (--dry-run --itemize-changes --delete;
    drift for validate -l, the plan of update --dry-run), without the image's own /.qrmfs and the paths the
    preparation changed on purpose (rsync leaves them out, and treediff.prepared_change the directories made to hold
    them, /usr/lib/qrmfs of a source without /usr/lib). Changes nothing. alongside: called just before the dry run
    starts (to start agent work that runs during it)."""
    src = hosts.source_host(env.cfg, location)
    prepared = sorted(prepared_paths(manifest))
    source = copyplan.Source(src, location.path, ("/.qrmfs", *excludes, *prepared))
    side = env.side(storage)
    pulls = src is not None and not src.is_local and not storage.ssh.is_local
    if pulls:
        side.warm(forward_agent=True)  # the dry run's agent starts while the source's host key is pinned
    pinned = side.pin_host(target.path, hosts.source_known_hosts(env.runner, env.cfg, src)).known_hosts \
        if pulls and src is not None else None
    try:
        if alongside is not None:
            alongside()
        into = copyplan.Into(storage, target.path, storage.ssh.is_local, pinned)
        changes = _itemized(env, side, target.path, copyplan.plan(env.cfg, source, into, drift=True,
                                                                   whole=copyplan.whole_list(manifest)))
        return [c for c in changes if not prepared_change(change_kind(c["change"]), c["path"], frozenset(prepared))]
    finally:
        if pinned:
            side.unpin_host(target.path)


SILENT_SSH_END = 255


def _itemized(env: Env, side: StorageSide, path: str, cp: copyplan.CopyPlan) -> list[dict[str, str]]:
    changes: list[dict[str, str]] = []
    with hosts.agent_for(env.runner, cp, env.cfg.identity_file, env.agent) as agent_env:
        runner = env.runner.with_env(agent_env) if agent_env else env.runner

        def dry_run(c: copyplan.Copy) -> Result:
            sup = side.supervised(path, c.rsync, None, c.forward_agent) if c.on_storage else Supervised(c.rsync)
            return runner.stream(sup.argv, lambda _line: None, ok=range(256), input=sup.input, started=sup.started)

        for c in cp.copies:
            r = dry_run(c)
            if r.code == SILENT_SSH_END and not r.stderr.strip():
                # the remote side died without a word (bench/results/history.md, Investigations): a dry run
                # changes nothing, so it is run once more
                env.ui.warn("drift check: the ssh session ended without an exit status or a message (exit 255); "
                            "running the dry run once more")
                r = dry_run(c)
            check_rsync(r.code, r.stderr, "drift check: ")
            for line in r.stdout.splitlines():
                item = parse_item(line)
                if item:
                    changes.append({"change": item[0], "path": item[1]})
    return changes

