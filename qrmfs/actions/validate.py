"""qrmfs validate [--fix]: every preparation step's check on an existing image, what a bootable NFS root
needs, the manifest's consistency; --fix applies the same fixes create applies, then checks again.
With -l, the drift between image and source (rsync's dry-run itemized list), changing nothing."""

from __future__ import annotations

import dataclasses
import re
import time
from dataclasses import dataclass
from typing import Any

from ..agent import steps
from ..errors import TransferError
from ..model import Location, Target
from ..runner import tail
from ..storage import node_init_script
from ..transfer import RSYNC_MEANING, judge
from . import copyplan
from .common import Env, holder

DRIFT_SHOWN = 200
ITEM = re.compile(r"^(\*deleting|[<>ch.*][fdLDS][^ ]{7,9})\s+(.*)$")


@dataclass(frozen=True)
class ValidateRequest:
    target: Target
    fix: bool = False
    dry_run: bool = False  # with fix: report what --fix would repair, change nothing
    location: Location | None = None


def _manifest_findings(req: ValidateRequest, manifest: dict[str, Any] | None) -> list[dict[str, Any]]:
    if manifest is None:
        return [{"step": "manifest", "path": "/.qrmfs/manifest.json", "fixable": False,
                 "problem": "missing: not made by qrmfs, or damaged (remove and create again)"}]
    out = []
    for key, want in (("image", req.target.name), ("path", req.target.path)):
        if manifest.get(key) != want:
            out.append({"step": "manifest", "path": "/.qrmfs/manifest.json", "fixable": True,
                        "problem": f"{key} is {manifest.get(key)!r}, the tree is {want!r}"})
    for key in ("options", "rsync", "counts", "source"):
        if key not in manifest:
            out.append({"step": "manifest", "path": "/.qrmfs/manifest.json", "fixable": False,
                        "problem": f"has no {key!r}"})
    return out


def validate(req: ValidateRequest, env: Env) -> dict[str, Any]:
    storage, side, info = env.existing(req.target)
    manifest = info["manifest"]
    # Without a manifest the image's options are unknown: check and fix only what holds for every image
    # (keep its network configuration and services as they are).
    known = manifest.get("options", {}) if manifest else {"keep_network": True, "keep_services": True}
    opts = steps.Options.from_dict({**known, "image": req.target.name})
    if opts.shared or opts.private_add:
        opts = dataclasses.replace(opts, node_init=node_init_script())
    args = {"root": req.target.path, "options": dataclasses.asdict(opts)}
    findings = _manifest_findings(req, manifest) + side.call("check", **args)["findings"]
    result: dict[str, Any] = {"image": req.target.name, "target": str(req.target), "findings": findings}
    if req.fix and req.dry_run:
        result["would_fix"] = [f for f in findings if f["fixable"]]
    elif req.fix and findings:
        with side.lock(req.target.path, holder("validate --fix", req.target.name)):
            fixed = side.call("prepare", **args)["fixed"]
            if manifest is not None:
                side.call("manifest_update", path=req.target.path, export_root=storage.export_root,
                          patch={"image": req.target.name, "path": req.target.path})
                manifest = side.call("inspect", path=req.target.path, export_root=storage.export_root)["manifest"]
            after = _manifest_findings(req, manifest) + side.call("check", **args)["findings"]
        result.update(fixed=fixed + [f for f in findings if f["step"] == "manifest" and f["fixable"]],
                      findings_before_fix=findings, findings=after)
    result["clean"] = not result["findings"]
    if req.fix and not req.dry_run and manifest is not None:
        side.call("manifest_update", path=req.target.path, export_root=storage.export_root, patch={"validation": {
            "state": "clean" if result["clean"] else "problems", "findings": result["findings"],
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}})
    if req.location is not None:
        result["drift"] = drift(env, req, storage, manifest or {})
    return result


def drift(env: Env, req: ValidateRequest, storage: Any, manifest: dict[str, Any]) -> dict[str, Any]:
    """What differs between the source now and the image (rsync --dry-run --itemize-changes --delete)."""
    assert req.location is not None
    loc = req.location
    src = copyplan.source_host(env.cfg, loc)
    # paths the preparation changed on purpose are not drift
    prepared = sorted({f["path"] for f in manifest.get("preparation", {}).get("fixed", [])})
    excludes = ["/.qrmfs", *manifest.get("excludes", []), *prepared]
    side = env.side(storage)
    pinned = None
    if src is not None and not src.is_local and not storage.ssh.is_local:
        kh = copyplan.source_known_hosts(env.runner, env.cfg, src)
        pinned = side.call("pin_host", path=req.target.path, export_root=storage.export_root, known_hosts=kh)
    changes: list[dict[str, str]] = []
    try:
        cp = copyplan.plan(env.cfg, storage, src, loc.path, req.target.path, excludes, copyplan.Mounts(),
                           route="ssh", progress=False, storage_known_hosts=(pinned or {}).get("known_hosts"),
                           drift=True)
        with copyplan.agent_for(env.runner, cp, env.cfg.identity_file) as agent_env:
            runner = env.runner.with_env(agent_env) if agent_env else env.runner
            for c in cp.copies:
                r = runner.run(c.run, ok=range(256), timeout=3600)
                ok, _ = judge(r.code, r.stderr)
                if not ok:
                    raise TransferError(f"drift check: rsync exited with {r.code}: "
                                        f"{RSYNC_MEANING.get(r.code, 'failed')}", tail(r.stderr))
                for line in r.stdout.splitlines():
                    m = ITEM.match(line)
                    # a directory whose only difference is its time is noise left by the preparation
                    if m and m.group(2) != "./" and not re.fullmatch(r"\.d\.\.t\.*", m.group(1)):
                        changes.append({"change": m.group(1), "path": "/" + m.group(2).rstrip("/")})
    finally:
        if pinned:
            side.call("unpin_host", path=req.target.path, export_root=storage.export_root)
    return {"source": str(loc), "count": len(changes), "changes": changes[:DRIFT_SHOWN],
            "truncated": len(changes) > DRIFT_SHOWN}
