"""qrmfs list: the images on the storage server(s), from their manifests, with registration state taken
from the manifest and the spool (a registration still in the spool is pending)."""

from __future__ import annotations

from ..agent.manifest import Manifest
from ..config import Storage
from ..errors import QrmfsError, UsageError
from ..model import Target
from ..results import ImageRow, LeftoverRow, Listing, Registration, RegState, StorageFailure
from .common import Env
from .delivery import same_image


def registration_state(manifest: Manifest, pending: str | None) -> Registration:
    """What is known of an image's registration: its manifest's record, and a new_image of it in the spool."""
    reg = Registration.of_manifest(manifest)
    if pending:
        return Registration(RegState.PENDING, pending)
    if reg.state is RegState.PENDING:
        # the manifest says pending but this spool holds no job for it: it was delivered by a flush that
        # could not update the manifest (or from another admin host's spool); say what is known
        return Registration(RegState.UNKNOWN, reg.spool_job, "pending in the manifest, not in this spool")
    return reg


def storages(env: Env, storage_name: str | None) -> list[Storage]:
    """The one storage server named, or every one in the config."""
    if storage_name:
        return [env.cfg.storage_for(storage_name)]
    found = list(env.cfg.storage.values())
    if not found:
        raise UsageError("no storage servers in the config: name one, e.g. `qrmfs list 192.168.1.20`")
    return found


def list_images(env: Env, storage_name: str | None) -> Listing:
    waiting = [j for j in env.spool().jobs() if any(r.params.get("image_command") == "new_image" for r in j.requests)]
    images: list[ImageRow] = []
    errors: list[StorageFailure] = []
    leftovers: list[LeftoverRow] = []
    for s in storages(env, storage_name):
        try:
            listed = env.side(s).list()
        except QrmfsError as e:
            errors.append(StorageFailure(s.name, e.message))
            env.ui.warn(f"storage server {s.name}: {e.message}")
            continue
        leftovers += [LeftoverRow(s.name, x.path, x.image, x.kind, x.bytes, x.held_by) for x in listed.leftovers]
        for entry in listed.images:
            m = entry.manifest
            here = Target(s.name, entry.path)
            pending = next((j.id for j in waiting if same_image(env.cfg, j, here)), None)
            images.append(ImageRow(
                storage=s.name, name=m.image, path=entry.path, target=m.target or f"{s.name}:{entry.path}",
                bytes=m.bytes, files=m.files, created=m.created, source=m.source,
                shared=bool(m.option("shared")), arch=m.option("arch"), os=m.option("os"),
                validation=m.validation_state, registration=registration_state(m, pending),
                locked_by=entry.locked))
    return Listing(images, errors, leftovers)
