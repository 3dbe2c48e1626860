"""qrmfs/actions/copyplan.py: the hop is chosen once; each hop's rsync line, exactly where it matters."""

from __future__ import annotations

import shlex

import pytest

from qrmfs import argv as A
from qrmfs.actions.copyplan import Hop, Into, Source, hop, plan, whole_list
from qrmfs.agent.manifest import Manifest
from qrmfs.config import Config, SshHost, Storage
from qrmfs.errors import RefusedError
from qrmfs.mounts import Mounts

NAS = Storage("nas", SshHost("nas.lan", "root", 22), "/exports")
LOCAL = Storage("local", SshHost("local"), "/exports")
SRC = SshHost("src.lan", "root", 22)
CFG = Config(identity_file="/k/id", known_hosts="/k/kh")


@pytest.mark.parametrize(("src", "into", "want"), [
    (None, Into(LOCAL, "/exports/.i.qrmfs-staging-1", here=True), Hop.LOCAL),
    (None, Into(NAS, "/exports/.i.qrmfs-staging-1", here=False), Hop.PUSH),
    (SRC, Into(LOCAL, "/exports/.i.qrmfs-staging-1", here=True), Hop.PULL_HERE),
    (SRC, Into(NAS, "/exports/.i.qrmfs-staging-1", here=False), Hop.PULL_ON_STORAGE),
    (SshHost("nas.lan", "root", 22), Into(NAS, "/exports/.i.qrmfs-staging-1", here=False), Hop.ON_STORAGE),
])
def test_hop(src: SshHost | None, into: Into, want: Hop) -> None:
    assert hop(src, into) is want


def test_pull_on_storage_uses_the_pinned_key_and_a_forwarded_agent() -> None:
    pin = "/var/lib/qrmfs/pins/0a1b.known_hosts"
    p = plan(CFG, Source(SRC, "/"), Into(NAS, "/exports/.i.qrmfs-staging-1", False, pin))
    (c,) = p.copies
    assert p.needs_agent and c.on_storage and c.forward_agent
    rsh = shlex.split(c.rsync[c.rsync.index("-e") + 1])
    # the storage server's ssh trusts the pinned key only: not its own global known_hosts
    assert rsh[rsh.index(f"UserKnownHostsFile={pin}") + 1:][:2] == ["-o", "GlobalKnownHostsFile=/dev/null"]
    assert "-i" not in rsh
    assert c.rsync[-2:] == ("src.lan:/", "/exports/.i.qrmfs-staging-1/")


def test_push_runs_here_with_our_key() -> None:
    (c,) = plan(CFG, Source(None, "/srv/root"), Into(NAS, "/exports/.i.qrmfs-staging-1", False)).copies
    assert not c.on_storage and c.rsync[-2:] == ("/srv/root/", "nas.lan:/exports/.i.qrmfs-staging-1/")
    assert "-i /k/id" in c.rsync[c.rsync.index("-e") + 1]


@pytest.mark.parametrize("into", [Into(LOCAL, "/exports/.i.qrmfs-staging-1", True),
                                  Into(NAS, "/exports/.i.qrmfs-staging-1", False)])
def test_a_source_around_the_export_root_never_copies_the_images(into: Into) -> None:
    """The storage server's own / (or /exports' parent) as the source: the export root is left out, on the
    storage server as here, also inside a separately mounted filesystem that holds it."""
    src_host = None if into.here else SshHost("nas.lan", "root", 22)
    p = plan(CFG, Source(src_host, "/", mounts=Mounts(["/exports", "/srv"], [])), into)
    assert [c.what for c in p.copies] == ["root filesystem", "separate filesystem /srv"]  # /exports: not at all
    assert "--exclude=/exports" in p.copies[0].rsync
    # an export root inside a separate filesystem: left out of that filesystem's copy
    deep = Storage(into.storage.name, into.storage.ssh, "/srv/exports")
    _, srv = plan(CFG, Source(src_host, "/", mounts=Mounts(["/srv"], [])),
                  Into(deep, "/srv/exports/.i.qrmfs-staging-1", into.here)).copies
    assert "--exclude=/exports" in srv.rsync and srv.rsync[-2] == "/srv/"


def test_the_export_root_itself_as_source_is_refused() -> None:
    with pytest.raises(RefusedError, match="is the export root"):
        plan(CFG, Source(None, "/exports"), Into(LOCAL, "/exports/.i.qrmfs-staging-1", True))


# --- the first copy as a tar stream ---------------------------------------------------------------------

def test_stream_pull_on_storage_runs_tar_over_ssh_with_the_pinned_key() -> None:
    into = Into(NAS, "/exports/.i.qrmfs-staging-1", False, "/exports/.i.qrmfs-known_hosts")
    (c,) = plan(CFG, Source(SRC, "/", ("/var/cache/*",)), into, stream=True).copies
    assert c.stream is not None and c.on_storage and c.forward_agent
    send = c.stream.send
    assert send[:1] == ("ssh",) and send[-2:] == ("src.lan", shlex.join(
        A.tar_create_argv("/", excludes=["/var/cache/*"])))
    assert "UserKnownHostsFile=/exports/.i.qrmfs-known_hosts" in send and "/k/id" not in send
    assert c.stream.receive == A.tar_extract_argv("/exports/.i.qrmfs-staging-1")
    # an unclean stream is repaired by rsync on the same route, deleting what the source lacks
    assert c.stream.repair == A.rsync_argv("src.lan:/", "/exports/.i.qrmfs-staging-1", excludes=["/var/cache/*"],
                                           rsh=c.rsync[c.rsync.index("-e") + 1], delete=True)


def test_stream_on_storage_is_a_local_tar_per_filesystem() -> None:
    p = plan(CFG, Source(SshHost("nas.lan", "root", 22), "/", mounts=Mounts(["/srv"], [])),
             Into(NAS, "/exports/.i.qrmfs-staging-1", False), stream=True)
    root, srv = p.copies
    assert root.stream is not None and root.stream.send[0] == "tar" and "--exclude=./exports" in root.stream.send
    assert srv.stream is not None and srv.stream.send[-3:] == ("--directory", "/srv", ".")
    assert srv.stream.receive[-1] == "/exports/.i.qrmfs-staging-1/srv"
    assert [d["what"] for d in p.describe()] == ["root filesystem", "separate filesystem /srv"]
    d = p.describe()[0]
    assert (d["mechanism"], d["argv"], d["pipe_to"]) == ("tar stream", list(root.stream.send),
                                                         list(root.stream.receive))


@pytest.mark.parametrize(("src", "into", "kw"), [
    (SRC, Into(NAS, "/exports/.i.qrmfs-staging-1", False), {"delete": True}),  # an update: rsync's delta
    (SRC, Into(NAS, "/exports/.i.qrmfs-staging-1", False), {"drift": True}),
    (None, Into(NAS, "/exports/.i.qrmfs-staging-1", False), {}),   # push: rsync
    (SRC, Into(LOCAL, "/exports/.i.qrmfs-staging-1", True), {}),  # pull here: rsync
])
def test_no_stream_where_rsync_copies(src: SshHost | None, into: Into, kw: dict[str, bool]) -> None:
    (c,) = plan(CFG, Source(src, "/"), into, stream=True, **kw).copies
    assert c.stream is None


def test_no_stream_when_tar_cannot_say_an_exclude() -> None:
    into = Into(NAS, "/exports/.i.qrmfs-staging-1", False)
    (c,) = plan(CFG, Source(SRC, "/", ("*.log",)), into, stream=True).copies
    assert c.stream is None and "--exclude=*.log" in c.rsync
    (c,) = plan(CFG, Source(SRC, "/", ("/var/log/*.log",)), into).copies  # stream not asked for
    assert c.stream is None


@pytest.mark.parametrize(("manifest", "want"), [
    ({"counts": {"files": 100_000}}, True), ({"counts": {"files": 999_999}}, True),
    ({"counts": {"files": 1_000_000}}, False), ({"counts": {}}, False), ({}, False), (None, False),
    ({"counts": {"files": "many"}}, False)])
def test_rsync_sends_its_whole_file_list_first_below_a_million_entries(manifest: dict[str, object] | None,
                                                                      want: bool) -> None:
    """An update's or a drift check's rsync: the whole list first (faster), unless the image is too big to
    hold its list at each end, or its size is unknown."""
    m = None if manifest is None else Manifest.load(manifest)
    assert whole_list(m) is want
    into = Into(NAS, "/exports/.i.qrmfs-staging-1", False, "/pin")
    for kw in ({"delete": True}, {"drift": True}):
        (c,) = plan(CFG, Source(SRC, "/"), into, whole=whole_list(m), **kw).copies
        assert ("--no-inc-recursive" in c.rsync) is want
        assert c.rsync[:4] == ("rsync", "-aHAXS", "--numeric-ids", "--one-file-system")
