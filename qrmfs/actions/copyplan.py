"""How the bytes travel: the exact rsync command lines for one copy into a directory on the storage server.
Pure planning: nothing here starts a process (hosts.py does the running around a copy).

How a copy runs (docs/routes.md), decided once per plan by `hop()`:
- pull on the storage server (the ssh route's default): rsync runs ON the storage server and pulls from the
  source host over ssh, with this machine's key forwarded through an ssh agent and the source's host key
  pinned in a known_hosts file the agent wrote: data flows source -> storage in one hop;
- local copy on the storage server: the source is the storage server itself (clone on the same server);
- push: a local source (a directory, or `/`) is pushed to the storage server over ssh;
- pull here / local: the image's tree is reachable here (a `local` storage server, or the NFS mount of
  `--route nfs`), so rsync runs here, pulling from the source host or copying locally.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .. import argv as A
from ..agent.manifest import Manifest
from ..config import Config, SshHost, Storage
from ..errors import RefusedError
from ..mounts import Mounts, rebase_excludes


class Hop(enum.Enum):
    PULL_ON_STORAGE = "pull on the storage server"
    ON_STORAGE = "local copy on the storage server"
    PUSH = "push to the storage server"
    PULL_HERE = "pull here"
    LOCAL = "local copy"


@dataclass(frozen=True)
class Source:
    """What to copy: a tree on a host (None: this machine), what to leave out, what is mounted below it."""
    host: SshHost | None
    path: str
    excludes: tuple[str, ...] = ()
    mounts: Mounts = field(default_factory=Mounts)
    live_root: bool = True  # a running system: leave out the contents of /proc, /sys, /dev, ...


@dataclass(frozen=True)
class Into:
    """Where the copy goes: a directory of `storage`, reached here when `here` (a local storage server or the
    NFS mount); known_hosts is the storage-side pin file of the source's host key (pull on the storage server)."""
    storage: Storage
    path: str
    here: bool
    known_hosts: str | None = None


@dataclass(frozen=True)
class Stream:
    """A first copy as a tar stream, run on the storage server under the agent: `send` writes the tree to its
    stdout (tar on the source, through ssh when the source is another host; holes are skipped with SEEK_HOLE),
    `receive` extracts it into the empty staging directory. `repair`: the rsync run after a stream that did
    not end cleanly (a file changed while tar read it, tar missing on the source, ...): it brings the
    staging copy to the source's state with rsync's own judgement."""
    send: tuple[str, ...]
    receive: tuple[str, ...]
    repair: tuple[str, ...]


@dataclass(frozen=True)
class Copy:
    """One rsync: its argv (recorded in the manifest), run here, or on the storage server under the agent's
    supervision (then with our ssh-agent forwarded when it pulls from the source). With a stream, the stream
    runs instead, and rsync (its repair argv) only when the stream did not end cleanly."""
    rsync: tuple[str, ...]
    runs_on: str
    what: str
    on_storage: bool = False
    forward_agent: bool = False
    within: str = ""        # where in the image this copy lands ("" for the root, "/boot" for a separate /boot)
    stream: Stream | None = None


@dataclass(frozen=True)
class CopyPlan:
    hop: Hop
    copies: tuple[Copy, ...]
    mounts: Mounts

    @property
    def needs_agent(self) -> bool:
        """The storage server logs in to the source with our key: an ssh-agent must be forwarded."""
        return self.hop is Hop.PULL_ON_STORAGE

    def describe(self) -> list[dict[str, object]]:
        return [{"what": c.what, "runs_on": c.runs_on, "argv": list(c.rsync)} if c.stream is None else
                {"what": c.what, "runs_on": c.runs_on, "mechanism": "tar stream", "argv": list(c.stream.send),
                 "pipe_to": list(c.stream.receive), "repair_if_unclean": list(c.stream.repair)} for c in self.copies]


def hop(src: SshHost | None, into: Into) -> Hop:
    if src is None:
        return Hop.LOCAL if into.here else Hop.PUSH
    if into.here:
        return Hop.PULL_HERE
    if (src.address, src.port) == (into.storage.ssh.address, into.storage.ssh.port):
        return Hop.ON_STORAGE
    return Hop.PULL_ON_STORAGE


def parts(src: Source, dest: str) -> list[tuple[str, str, list[str], str]]:
    """(source dir, destination dir, excludes, label): the root, then each separate filesystem below it that the
    operator did not exclude."""
    out = [(src.path, dest, list(src.excludes), "root filesystem")]
    base = src.path.rstrip("/")
    for mp in src.mounts.include:
        if any(mp == base + e or mp.startswith(base + e + "/") for e in src.excludes):
            continue  # the operator excluded it (or a directory above it)
        out.append((mp, dest + mp[len(base):], rebase_excludes(src.excludes, mp, src.path),
                    f"separate filesystem {mp}"))
    return out


WHOLE_LIST_MAX = 1_000_000  # entries: rsync's whole file list then stays near 45 MB at each end


def whole_list(manifest: Manifest | None) -> bool:
    """Whether rsync, comparing the source with an image (an update, a drift check), sends its whole file list
    first (argv.rsync_argv): where the image's manifest says it holds fewer than WHOLE_LIST_MAX entries.
    Bigger trees keep rsync's incremental recursion, whose memory stays flat."""
    files = manifest.files if manifest is not None else None
    return files is not None and files < WHOLE_LIST_MAX


def plan(cfg: Config, src: Source, into: Into, *, progress: bool = False, drift: bool = False,  # noqa: PLR0913
         delete: bool = False, stream: bool = False, whole: bool = False) -> CopyPlan:
    """The rsync command lines copying src into `into`: one for the root and one per separate filesystem.
    delete: `into` already holds a copy of the image (an update): rsync deletes what the source lacks.
    stream: `into` is an empty staging directory: where the copy runs on the storage server and tar can say
    every exclude, a tar stream makes it (rsync repairs an unclean one).
    whole: rsync sends its whole file list first (see whole_list)."""
    host = None if src.host is None or src.host.is_local else src.host
    how = hop(host, into)
    storage = into.storage
    copies = []
    for i, (sp, dp, exc, what) in enumerate(parts(src, into.path)):
        rsh = None
        s, d = sp, dp
        if how in (Hop.LOCAL, Hop.ON_STORAGE) and (storage.export_root + "/").startswith(sp.rstrip("/") + "/"):
            # the source is the storage server's own tree, around its export root: never copy the images
            # (the one being made among them) into themselves
            inside = storage.export_root[len(sp.rstrip("/")):]
            if not inside and i == 0:
                raise RefusedError(f"the source {sp} is the export root of storage server {storage.name}: "
                                   "an image is never made of the images")
            if not inside:
                continue  # a separate filesystem that is the export root itself: nothing of it is copied
            exc = [*exc, inside]
        if how is Hop.PUSH:
            rsh, d = A.rsync_rsh(storage.ssh, identity=cfg.identity_file, known_hosts=cfg.known_hosts), \
                A.remote_spec(storage.ssh, dp)
        elif how is Hop.PULL_HERE and host is not None:
            rsh, s = A.rsync_rsh(host, identity=cfg.identity_file, known_hosts=cfg.known_hosts), \
                A.remote_spec(host, sp)
        elif how is Hop.PULL_ON_STORAGE and host is not None:
            rsh, s = A.rsync_rsh(host, known_hosts=into.known_hosts, known_hosts_only=True), A.remote_spec(host, sp)
        rs = A.rsync_argv(s, d, excludes=exc, rsh=rsh, progress=progress, live_root=src.live_root and i == 0,
                          drift=drift, delete=delete, whole_list=whole)
        ends = _stream(host, sp, dp, exc, src.live_root and i == 0, into, how, progress) \
            if stream and not (drift or delete) else None
        st = None if ends is None else Stream(*ends, A.rsync_argv(s, d, excludes=exc, rsh=rsh, progress=progress,
                                                                   live_root=src.live_root and i == 0, delete=True))
        copies.append(Copy(rs, _where(how, storage, host), what,
                           on_storage=how in (Hop.ON_STORAGE, Hop.PULL_ON_STORAGE),
                           forward_agent=how is Hop.PULL_ON_STORAGE, within=dp[len(into.path):], stream=st))
    return CopyPlan(how, tuple(copies), src.mounts)


def _stream(host: SshHost | None, sp: str, dp: str, excludes: list[str], live_root: bool, into: Into,  # noqa: PLR0913
            how: Hop, progress: bool = False) -> tuple[tuple[str, ...], tuple[str, ...]] | None:
    """(send, receive) of a tar stream from sp into dp, both run on the storage server; None where the copy
    does not run there or tar cannot say an exclude exactly as rsync means it."""
    if how not in (Hop.PULL_ON_STORAGE, Hop.ON_STORAGE) or any(A.tar_pattern(e) is None for e in excludes):
        return None
    send = A.tar_create_argv(sp, excludes=excludes, live_root=live_root)
    if how is Hop.PULL_ON_STORAGE and host is not None:
        send = A.ssh_argv(host, send, known_hosts=into.known_hosts, known_hosts_only=True)  # the pinned key alone
    return send, A.tar_extract_argv(dp, progress=progress)


def _where(how: Hop, storage: Storage, host: SshHost | None) -> str:
    if how is Hop.PULL_ON_STORAGE and host is not None:
        return f"storage {storage.name} (pulls from {host.address})"
    if how is Hop.ON_STORAGE:
        return f"storage {storage.name} (local copy)"
    return {Hop.PUSH: "local (push to storage)", Hop.PULL_HERE: "local (pull from source)"}.get(how, "local")
