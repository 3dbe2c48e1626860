"""qrmfs list: the images on the storage server(s), from their manifests, with registration state taken
from the manifest and the spool (a registration still in the spool is pending)."""

from __future__ import annotations

from typing import Any

from ..errors import QrmfsError, UsageError
from .common import Env


def registration_state(manifest: dict[str, Any], pending_targets: dict[str, str]) -> str:
    reg = manifest.get("registration", {})
    state = reg.get("state", "unknown")
    target = manifest.get("target", "")
    if target in pending_targets:
        return f"pending (spool job {pending_targets[target]})"
    if state == "pending":
        return "registered (delivered from the spool)"
    if state.startswith("not registered"):
        return "not registered"
    return state


def list_images(env: Env, storage_name: str | None) -> dict[str, Any]:
    if storage_name:
        storages = [env.cfg.storage_for(storage_name)]
    else:
        storages = list(env.cfg.storage.values())
        if not storages:
            raise UsageError("no storage servers in the config: name one, e.g. `qrmfs list 192.168.1.20`")
    pending = {j.target: j.id for j in env.spool().jobs()
               if any(r.params.get("image_command") == "new_image" for r in j.requests)}
    images: list[dict[str, Any]] = []
    errors: list[dict[str, str]] = []
    for s in storages:
        try:
            found = env.side(s).call("list", export_root=s.export_root)
        except QrmfsError as e:
            errors.append({"storage": s.name, "error": e.message})
            env.ui.warn(f"storage server {s.name}: {e.message}")
            continue
        for entry in found:
            m = entry["manifest"]
            o = m.get("options", {})
            images.append({
                "storage": s.name, "name": m.get("image"), "path": entry["path"],
                "target": m.get("target", f"{s.name}:{entry['path']}"),
                "bytes": m.get("counts", {}).get("bytes"), "files": m.get("counts", {}).get("files"),
                "created": m.get("created"), "source": m.get("source"),
                "shared": bool(o.get("shared")), "arch": o.get("arch"), "os": o.get("os"),
                "validation": m.get("validation", {}).get("state", "unknown"),
                "registration": registration_state(m, pending),
                "locked_by": entry.get("locked"),
            })
    return {"images": images, "errors": errors}
