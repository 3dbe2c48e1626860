"""qrmfs gc: remove what unfinished operations left beside images (staging copies, half-removed trees, lock
files without an image) and the pinned source keys they left in the agent's pin directory (outside the
export), each under its image's lock: taking the lock removes them
(tree.take_lock), and a lock file whose image is gone goes when the lock is given back. Earlier generations
are not left-overs: `remove` (or generation pruning) deletes them; nor is an image's spare (the next update's
starting tree), which `remove` deletes with the image. But an update keeps a generation beyond
keep_generations while nodes run it (agent/holds.py): gc prunes each image as an update would, so such a
generation goes once its last node rebooted into another one or stopped reporting."""

from __future__ import annotations

import posixpath

from ..errors import LockedError
from ..results import Collected
from .common import Env, holder, kept_for_nodes
from .listing import storages


def gc(env: Env, storage_name: str | None) -> Collected:
    removed: list[str] = []
    in_use: list[str] = []
    held: list[str] = []
    for s in storages(env, storage_name):
        side = env.side(s)
        listed = side.list()
        doomed = [x for x in listed.leftovers if x.kind not in ("previous", "generation", "spare", "foreign")]
        images = {x.path for x in listed.images}
        for image in sorted(images | {x.image for x in doomed}):
            try:
                with side.lock(image, holder("gc", posixpath.basename(image))):
                    if image in images:
                        pruned = side.prune(image, env.cfg.keep_generations, env.cfg.spare, env.cfg.node_timeout)
                        removed += pruned.pruned
                        in_use += pruned.failed
                        held += [h.path for h in pruned.held]
                        kept_for_nodes(env, pruned.held)
            except LockedError:
                in_use += [x.path for x in doomed if x.image == image]
        left = {x.path for x in side.list().leftovers}
        removed += [x.path for x in doomed if x.path not in left]
    for p in removed:
        env.ui.step(f"removed {p}")
    return Collected(removed, in_use, held)
