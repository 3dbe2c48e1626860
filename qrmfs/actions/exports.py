"""The image's own NFS export, where the storage server's config says who serves it (`exports`, agent/exports.py):
create and clone add it, update and rollback refresh it after the generation exchange, remove takes it away once
the image is gone, validate reports a missing one and `validate --fix` adds it. Nothing with `exports = "none"`.

An export step that fails after the image was published cannot undo the publish: the operation goes on (the
registration is sent), then ends with an error that names the failure and its repair (`validate --fix`, or the
next update, which exports the image again in any case)."""

from __future__ import annotations

from ..agent.protocol import Exported, FindingRecord
from ..errors import QrmfsError, StorageError
from ..model import Target
from ..storage import StorageSide
from .common import Env


def configured(side: StorageSide) -> bool:
    return side.storage.exports != "none"


def describe(e: Exported) -> str:
    server = {"kernel": "the kernel NFS server", "ganesha": "nfs-ganesha"}.get(e.kind, e.kind)
    return f"{e.path} exported by {server}" + (f" (Export_Id {e.export_id})" if e.export_id is not None else "")


def apply(env: Env, side: StorageSide, target: Target, action: str) -> Exported | StorageError | None:
    """Add, refresh or remove the export after the image's tree changed. A failure is returned (and warned about),
    never raised: the caller finishes what it does (the registration), then raises it (failed())."""
    if not configured(side):
        return None
    try:
        done = side.export(target.path, action)
    except QrmfsError as e:
        repair = (f"remove it from {side.storage.exports_table} and reload the NFS server by hand" if action == "remove"
                  else f"`qrmfs validate --fix -t {target}` (or the next update) exports it again")
        err = StorageError(f"{target}: its NFS export could not be {'removed' if action == 'remove' else 'made'} "
                           f"({e.message}); {repair}", e.detail)
        env.ui.warn(err.message)
        return err
    env.ui.step(f"NFS export: {describe(done)}" if done.state == "exported" else f"NFS export of {target} removed")
    return done


def failed(outcome: Exported | StorageError | None) -> None:
    if isinstance(outcome, StorageError):
        raise outcome


def shown(outcome: Exported | StorageError | None) -> str | None:
    return describe(outcome) if isinstance(outcome, Exported) else None


def findings(side: StorageSide, path: str) -> list[FindingRecord]:
    """validate: the image's export, as the NFS server lists it, refreshed since its generation was published."""
    if not configured(side):
        return []
    state = side.export(path, "show").state
    where = f"{side.storage.exports}, {side.storage.exports_table}"
    if state == "absent":
        return [FindingRecord("export", path, f"not exported ({where})", True)]
    if state == "stale":
        return [FindingRecord("export", path, "exported, but not since the current generation was published: new "
                                              f"mounts may get an earlier one ({where})", True)]
    return []
