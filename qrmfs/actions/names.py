"""openQRM image names are unique (image_info.image_name; remove_by_name removes every record of a name): an
image is never registered under a name that is registered, or waits in the spool, for another path.

openQRM offers no query for its records (openqrm-api.md), so qrmfs decides from what it knows itself: the
manifests of the images on every configured storage server (and on the target's), and the spool's jobs."""

from __future__ import annotations

from ..errors import ExistsError, QrmfsError
from ..model import Target
from ..results import Registration
from .common import Env, identity_of, storage_identity
from .delivery import same_image


def registered_elsewhere(env: Env, name: str, target: Target) -> list[str]:
    """Where else the openQRM name is held: "storage:/path (registration sent)" or "spool job ID (for storage:/path)".
    A storage server that cannot be reached is warned about and skipped: it cannot be checked."""
    mine = storage_identity(env.cfg, str(target))
    found: list[str] = []
    servers = {s.name: s for s in env.cfg.storage.values()}
    here = env.storage(target)
    servers.setdefault(here.name, here)
    seen: set[tuple[str, int, str]] = set()
    for s in servers.values():
        env.side(s).connect()  # every server's ssh handshake at once, not one after the other
    for s in servers.values():
        try:
            listed = env.side(s).list(leftovers=False)  # the images' manifests only: no generation is walked
        except QrmfsError as e:
            env.ui.warn(f"could not check storage server {s.name} for an image named {name} ({e.message})")
            continue
        for entry in listed.images:
            ident = identity_of(s, entry.path)
            key = (ident["address"], ident["port"], entry.path)
            if entry.manifest.image != name or ident == mine or key in seen:
                continue
            seen.add(key)
            reg = Registration.of_manifest(entry.manifest)
            if reg.has_record:  # openQRM has (or may have, or will get) a record of that name
                found.append(f"{s.name}:{entry.path} (registration {reg.state.value})")
    for job in env.spool().jobs():
        registers = [r for r in job.requests if r.kind == "image" and r.params.get("image_name") == name]
        if registers and registers[-1].params.get("image_command") == "new_image" and not same_image(
                env.cfg, job, target):
            found.append(f"spool job {job.id} (for {job.target})")
    return found


def check_name_free(env: Env, name: str, target: Target) -> None:
    """Refuse (exit 5) before anything is touched when the name is held for another path."""
    elsewhere = registered_elsewhere(env, name, target)
    if elsewhere:
        raise ExistsError(f"the openQRM image name {name} is already taken by {', '.join(elsewhere)}: openQRM image "
                          f"names are unique, so {target} cannot be registered under it; choose another last path "
                          "component, remove that image first, or use -o/--only-physical")
