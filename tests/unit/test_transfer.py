"""qrmfs/transfer.py: separate filesystems, exclude rebasing, rsync's progress and --stats, exit codes."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

from qrmfs import argv as A
from qrmfs import transfer
from qrmfs.actions import copyplan
from qrmfs.config import Config, SshHost, Storage
from qrmfs.errors import TransferError
from qrmfs.mounts import Mounts, mounts_below, rebase_excludes, source_mounts
from qrmfs.runner import Result, Runner
from qrmfs.transfer import judge, parse_progress, parse_stats

# A Debian host: separate /boot, /boot/efi, /var, /home and /srv/my data; docker's bind mounts, an NFS home,
# pseudo filesystems, a bind of a directory of the root fs, and a file bind (container style).
MOUNTINFO = r"""22 1 8:2 / / rw,relatime shared:1 - ext4 /dev/sda2 rw,errors=remount-ro
23 22 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
24 22 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:2 - sysfs sysfs rw
25 22 0:5 / /dev rw,nosuid,relatime shared:8 - devtmpfs udev rw,size=8123456k,nr_inodes=2030864,mode=755
26 25 0:23 / /dev/pts rw,nosuid,noexec,relatime shared:9 - devpts devpts rw,gid=5,mode=620,ptmxmode=000
27 22 0:24 / /run rw,nosuid,nodev,noexec,relatime shared:5 - tmpfs tmpfs rw,size=1627324k,mode=755
28 22 8:1 / /boot rw,relatime shared:29 - ext4 /dev/sda1 rw
29 28 8:4 / /boot/efi rw,relatime shared:31 - vfat /dev/sda4 rw,fmask=0077,dmask=0077,codepage=437
30 22 253:1 / /var rw,relatime shared:33 - ext4 /dev/mapper/vg-var rw
31 22 253:2 / /home rw,relatime shared:35 - xfs /dev/mapper/vg-home rw,attr2,inode64
32 22 253:3 / /srv/my\040data rw,relatime shared:37 - ext4 /dev/mapper/vg-data rw
33 22 8:2 /srv/www /var/www rw,relatime shared:1 - ext4 /dev/sda2 rw,errors=remount-ro
34 22 0:50 / /mnt/nfs rw,relatime shared:40 - nfs4 fs1:/export/share rw,vers=4.2,addr=10.0.0.1
35 22 0:51 / /tmp rw,nosuid,nodev shared:41 - tmpfs tmpfs rw
36 30 0:52 / /var/lib/docker/overlay2/abc/merged rw,relatime - overlay overlay rw,lowerdir=/x
37 22 0:53 / /media/nas rw,relatime - cifs //nas/share rw,vers=3.0
38 22 253:1 /lib/app/hosts /etc/app-hosts rw,relatime - ext4 /dev/mapper/vg-var rw
39 22 8:5 / /opt rw,relatime - btrfs /dev/sda5 rw,space_cache=v2,subvolid=5,subvol=/
"""


def test_mounts_below_live_root() -> None:
    m = mounts_below(MOUNTINFO, "/")
    # "/" itself: see test_mounts_below_live_root_never_includes_root (xfail)
    assert [p for p in m.include if p != "/"] == ["/boot", "/boot/efi", "/home", "/opt", "/srv/my data", "/var"]
    assert m.skipped == [
        {"path": "/var/www", "fstype": "ext4", "why": "bind mount of /srv/www"},
        {"path": "/mnt/nfs", "fstype": "nfs4", "why": "network filesystem"},
        {"path": "/media/nas", "fstype": "cifs", "why": "network filesystem"},
        {"path": "/etc/app-hosts", "fstype": "ext4", "why": "bind mount of /lib/app/hosts"},
    ]


def test_the_mounts_command_lists_directory_mount_points_and_not_a_bind_mounted_file(tmp_path: Path) -> None:
    """argv.mounts_argv run for real by sh, its `cat` replaced to print a table whose mount points are a
    directory with a space in its name, a file, and a missing path: only the directory is a directory."""
    (tmp_path / "my dir").mkdir()
    (tmp_path / "hosts").write_text("x\n")
    d, f = str(tmp_path / "my dir").replace(" ", "\\040"), str(tmp_path / "hosts")
    table = (f"40 22 8:2 /srv/a {d} rw - ext4 /dev/sda2 rw\n"
             f"41 22 8:2 /lib/hosts {f} rw - ext4 /dev/sda2 rw\n"
             f"42 22 8:2 /srv/b {tmp_path}/gone rw - ext4 /dev/sda2 rw")
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "cat").write_text(f"#!/bin/sh\nprintf '%s\\n' {shlex.quote(table)}\n")
    (bin_ / "cat").chmod(0o755)
    out = subprocess.run(A.mounts_argv(str(tmp_path)), capture_output=True, text=True, check=True,
                         env={**os.environ, "PATH": f"{bin_}:{os.environ['PATH']}"}).stdout
    m = source_mounts(out, str(tmp_path))
    assert m.skipped == [{"path": str(tmp_path / "my dir"), "fstype": "ext4", "why": "bind mount of /srv/a"}]


def test_the_mounts_command_runs_on_this_machine() -> None:
    m = source_mounts(subprocess.run(A.mounts_argv("/"), capture_output=True, text=True, check=True).stdout, "/")
    assert all(s["path"].startswith("/") for s in m.skipped) and "/" not in m.include


def test_mounts_below_ignores_pseudo_filesystems_silently() -> None:
    m = mounts_below(MOUNTINFO, "/")
    listed = set(m.include) | {s["path"] for s in m.skipped}
    for pseudo in ("/proc", "/sys", "/dev", "/dev/pts", "/run", "/tmp", "/var/lib/docker/overlay2/abc/merged"):
        assert pseudo not in listed


def test_mounts_below_live_root_never_includes_root() -> None:
    m = mounts_below(MOUNTINFO, "/")
    assert m.include == ["/boot", "/boot/efi", "/home", "/opt", "/srv/my data", "/var"]
    p = _plan(["/home/big"], m)
    # every copy of the root filesystem leaves out /home/big and /swapfile
    for c in p.copies:
        if c.rsync[-2] == "/":
            assert "--exclude=/home/big" in c.rsync and "--exclude=/swapfile" in c.rsync


def test_mounts_below_directory_root() -> None:
    text = ("40 22 8:2 / /srv/rootfs rw - ext4 /dev/sdb1 rw\n"
            "41 40 8:3 / /srv/rootfs/var rw - ext4 /dev/sdb2 rw\n"
            "42 40 8:4 / /srv/rootfs/usr rw shared:3 master:2 - xfs /dev/sdb3 rw\n"
            "43 22 8:5 / /srv/rootfs2/var rw - ext4 /dev/sdb5 rw\n"
            "44 22 8:6 / /srv/other rw - ext4 /dev/sdb6 rw\n"
            "45 40 0:60 / /srv/rootfs/proc rw - proc proc rw\n")
    m = mounts_below(text, "/srv/rootfs")
    assert m.include == ["/srv/rootfs/usr", "/srv/rootfs/var"]
    assert m.skipped == []
    assert mounts_below(text, "/srv/rootfs/").include == ["/srv/rootfs/usr", "/srv/rootfs/var"]


def test_mounts_below_first_entry_per_mountpoint_and_garbage() -> None:
    text = ("30 22 253:1 / /var rw - ext4 /dev/vg/var rw\n"
            "31 22 0:44 / /var rw - tmpfs tmpfs rw\n"
            "garbage line\n"
            "\n"
            "32 22 253:5 / /data rw - \n")
    assert mounts_below(text, "/") == Mounts(["/var"], [])


def test_mounts_below_octal_escapes() -> None:
    text = ("30 22 253:1 / /srv/a\\040b\\011c\\134d rw - ext4 /dev/x rw\n"
            "31 22 253:1 /my\\040dir /mnt/bind\\040here rw - ext4 /dev/x rw\n")
    m = mounts_below(text, "/")
    assert m.include == ["/srv/a b\tc\\d"]
    assert m.skipped == [{"path": "/mnt/bind here", "fstype": "ext4", "why": "bind mount of /my dir"}]


def test_mounts_below_btrfs_subvolume_is_copied() -> None:
    text = ("22 1 0:30 /@ / rw,relatime shared:1 - btrfs /dev/sda2 rw,space_cache=v2,subvolid=256,subvol=/@\n"
            "30 22 0:30 /@var /var rw,relatime shared:2 - btrfs /dev/sda2 rw,space_cache=v2,subvolid=258,"
            "subvol=/@var\n"
            "31 22 0:30 /@home /home rw,relatime shared:3 - btrfs /dev/sda2 rw,subvolid=257,subvol=/@home\n")
    m = mounts_below(text, "/")
    assert m.include == ["/home", "/var"]
    assert m.skipped == []


def _plan(excludes: list[str], mounts: Mounts, staging: str = "/exports/.img.qrmfs-staging-1") -> copyplan.CopyPlan:
    """The copy plan of the live root `/` of this machine into a local storage server's staging dir."""
    storage = Storage("local", SshHost("local"), "/exports")
    return copyplan.plan(Config(), copyplan.Source(None, "/", tuple(excludes), mounts),
                         copyplan.Into(storage, staging, here=True))


# --- excludes inside separate filesystems ----------------------------------------------------------

def test_rebase_excludes_live_root() -> None:
    ex = ["/var/cache", "/home/big", "/var/lib/docker", "/variable", "/var"]
    assert rebase_excludes(ex, "/var", "/") == ["/cache", "/lib/docker"]
    assert rebase_excludes(ex, "/home", "/") == ["/big"]
    assert rebase_excludes(ex, "/boot", "/") == []


def test_rebase_excludes_directory_root() -> None:
    # excludes are image paths (anchored at the source root); mount points are host paths
    ex = ["/var/cache/apt", "/srv/rootfs/var/log", "/usr/share/doc"]
    assert rebase_excludes(ex, "/srv/rootfs/var", "/srv/rootfs") == ["/cache/apt"]
    assert rebase_excludes(ex, "/srv/rootfs/usr", "/srv/rootfs") == ["/share/doc"]


def test_excluded_mountpoint_is_not_copied() -> None:
    p = _plan(["/var", "/srv"], Mounts(["/srv/data", "/var"], []))
    assert [c.what for c in p.copies] == ["root filesystem"]


def test_live_root_copy_to_local_storage_excludes_its_own_staging() -> None:
    staging = "/exports/.img.qrmfs-staging-1"
    p = _plan([], Mounts(), staging)
    (c,) = p.copies
    excluded = [a[len("--exclude="):].rstrip("*").rstrip("/") for a in c.rsync if a.startswith("--exclude=")]
    assert any(staging == e or staging.startswith(e + "/") for e in excluded), excluded


def test_plan_copies_separate_filesystem_with_rebased_excludes() -> None:
    p = _plan(["/var/cache"], Mounts(["/var"], []), "/exports/.i.qrmfs-staging-1")
    assert [c.rsync for c in p.copies][1] == (
        "rsync", "-aHAXS", "--numeric-ids", "--one-file-system", "--stats", "--filter=-xs system.*",
        "--filter=-xr system.*", "--filter=-xs trusted.SGI_*", "--filter=-xr trusted.SGI_*", "--exclude=/cache",
        "/var/", "/exports/.i.qrmfs-staging-1/var/")


# --- progress ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("line", "want"), [
    ("        100,003  50%   64.12MB/s    0:00:00 (xfr#2, to-chk=0/6)", (100003, 50, "64.12MB/s")),
    ("         32,768  16%    0.00kB/s    0:00:00  ", (32768, 16, "0.00kB/s")),
    ("  1,234,567,890 100%  112.45MB/s    0:00:10 (xfr#12345, ir-chk=1000/54321)", (1234567890, 100, "112.45MB/s")),
    ("              0   0%    0.00kB/s    0:00:00", (0, 0, "0.00kB/s")),
])
def test_parse_progress_rsync_lines(line: str, want: tuple[int, int, str]) -> None:
    assert parse_progress(line) == want


@pytest.mark.parametrize("line", ["", "sending incremental file list", "Number of files: 6 (reg: 3, dir: 2)",
                                  "rsync: [sender] change_dir \"/x\" failed", "etc/passwd", "total size is 200,004"])
def test_parse_progress_other_lines(line: str) -> None:
    assert parse_progress(line) is None


# --- stats -------------------------------------------------------------------------------------------

STATS_327 = """
Number of files: 123,456 (reg: 100,000, dir: 20,000, link: 3,000, dev: 400, special: 56)
Number of created files: 123,455 (reg: 100,000, dir: 19,999, link: 3,000, dev: 400, special: 56)
Number of deleted files: 0
Number of regular files transferred: 99,999
Total file size: 5,368,709,120 bytes
Total transferred file size: 5,000,000,000 bytes
Literal data: 5,000,000,000 bytes
Matched data: 0 bytes
File list size: 3,145,728
File list generation time: 0.001 seconds
File list transfer time: 0.000 seconds
Total bytes sent: 5,003,145,728
Total bytes received: 1,999,980

sent 5,003,145,728 bytes  received 1,999,980 bytes  55,555,555.55 bytes/sec
total size is 5,368,709,120  speedup is 1.07
"""


def test_parse_stats_large_numbers() -> None:
    assert parse_stats(STATS_327) == {"files": 123456, "created": 123455, "regular_transferred": 99999,
                                      "bytes": 5368709120, "bytes_transferred": 5000000000,
                                      "deleted": 0}


def test_parse_stats_ignores_other_text() -> None:
    assert parse_stats("sending incremental file list\netc/\nNumber of files: n/a\n") == {}


needs_rsync = pytest.mark.skipif(shutil.which("rsync") is None, reason="rsync not installed")


def _tree(src: Path) -> None:
    (src / "d").mkdir(parents=True)
    (src / "a").write_bytes(os.urandom(100_000))
    (src / "d" / "b").write_bytes(b"hi\n")
    os.link(src / "a", src / "h")
    os.symlink("a", src / "l")


@needs_rsync
def test_run_rsync_real_local_copy(tmp_path: Path) -> None:
    from qrmfs import argv as A

    src, dst = tmp_path / "src", tmp_path / "dst"
    _tree(src)
    dst.mkdir()
    seen: list[tuple[int, int, str]] = []
    argv = A.rsync_argv(str(src), str(dst), progress=True, live_root=False)
    stats, warning, code = transfer.run_rsync(Runner().with_env({"LC_ALL": "C"}), argv,
                                              lambda b, p, r: seen.append((b, p, r)))
    assert (warning, code) == (None, 0)
    # a is transferred once (-H), h is its hard link; the symlink's size is the length of its target
    assert stats == {"files": 6, "created": 5, "regular_transferred": 2, "bytes": 200_004,
                     "bytes_transferred": 100_003, "deleted": 0}
    assert seen and seen[-1][0] == 100_003
    assert os.stat(dst / "a").st_ino == os.stat(dst / "h").st_ino
    assert os.readlink(dst / "l") == "a"


@needs_rsync
def test_run_rsync_real_failure_is_transfer_error(tmp_path: Path) -> None:
    from qrmfs import argv as A

    (tmp_path / "dst").mkdir()
    argv = A.rsync_argv(str(tmp_path / "missing"), str(tmp_path / "dst"), live_root=False)
    with pytest.raises(TransferError) as ei:
        transfer.run_rsync(Runner().with_env({"LC_ALL": "C"}), argv, None)
    assert ei.value.message == "rsync exited with 23: partial transfer due to error"
    assert "change_dir" in ei.value.detail and "No such file or directory" in ei.value.detail


# --- exit codes ---------------------------------------------------------------------------------------

def test_judge() -> None:
    assert judge(0) == (True, None)
    assert judge(24) == (True, "some files vanished during the copy (normal on a live system)")
    assert judge(23) == (False, None)
    for code in (1, 2, 3, 5, 10, 11, 12, 20, 30, 35, 127, 255, -9):
        assert judge(code)[0] is False


def test_check_rsync_says_why_even_without_stderr() -> None:
    assert transfer.check_rsync(0, "") is None
    assert transfer.check_rsync(24, "vanished") == "some files vanished during the copy (normal on a live system)"
    with pytest.raises(TransferError) as ei:
        transfer.check_rsync(255, "", "drift check: ")
    assert ei.value.message == ("drift check: rsync exited with 255: the ssh session ended without an exit status "
                                "and without a message: the remote side was killed by a signal (the OOM killer, a "
                                "crash) or the connection was cut")
    assert ei.value.detail == "(rsync and ssh printed nothing on stderr)"
    with pytest.raises(TransferError) as ei:  # the storage-side supervisor's report of a death by signal
        transfer.check_rsync(137, "qrmfs agent: rsync on nas was killed by signal SIGKILL")
    assert ei.value.message == "rsync exited with 137: killed by signal SIGKILL"


@pytest.mark.parametrize(("stderr", "want"), [
    ('rsync: [receiver] rsync_xal_set: lsetxattr(""/exports/x/bin/ping"","security.capability") failed: '
     "Operation not supported (95)", "the target filesystem refused extended attributes or ACLs"),
    ("rsync: [generator] set_acl: sys_acl_set_file(etc, ACL_TYPE_ACCESS): Operation not supported (95)",
     "the target filesystem refused extended attributes or ACLs"),
    ("rsync: mkstemp failed: Operation not supported (95)", None),
    ("rsync: [receiver] write failed on \"/exports/x\": No space left on device (28)",
     "the target filesystem is full (No space left on device)"),
    ("rsync: write failed on \"/exports/x\": Disk quota exceeded (122)", "the target's disk quota is exceeded"),
    ("", None),
])
def test_refused_feature(stderr: str, want: str | None) -> None:
    assert transfer.refused_feature(stderr) == want


class FakeRunner:
    def __init__(self, code: int, stdout: str, stderr: str) -> None:
        self.code, self.stdout, self.stderr = code, stdout, stderr
        self.calls: list[tuple[tuple[str, ...], tuple[int, ...]]] = []

    def stream(self, argv: Sequence[str], on_line: Callable[[str], None], *, ok: Sequence[int] = (0,),
               input: bytes | None = None, started: object = None) -> Result:
        assert started is None  # nothing started early here
        self.calls.append((tuple(argv), tuple(ok)))
        for ln in self.stdout.splitlines():
            on_line(ln)
        return Result(tuple(argv), self.code, self.stdout, self.stderr)


def test_run_rsync_vanished_is_a_warning() -> None:
    r = FakeRunner(24, "  1,000 100%  1.00MB/s 0:00:00 (xfr#1, to-chk=0/1)\n" + STATS_327,
                   'file has vanished: "/var/run/x"\n')
    got: list[tuple[int, int, str]] = []
    stats, warning, code = transfer.run_rsync(r, ("rsync", "x"), lambda *a: got.append(a))  # type: ignore[arg-type]
    assert code == 24
    assert warning == "some files vanished during the copy (normal on a live system)"
    assert stats["files"] == 123456
    assert got == [(1000, 100, "1.00MB/s")]
    assert r.calls[0][1] == tuple(range(256))  # rsync's own codes are judged here, never by the runner


@pytest.mark.parametrize(("code", "stderr", "message"), [
    (23, "x\n" * 30 + "rsync error: some files/attrs were not transferred (code 23)",
     "rsync exited with 23: partial transfer due to error"),
    (23, 'rsync_xal_set: lsetxattr("x","user.a") failed: Operation not supported (95)',
     "rsync exited with 23: the target filesystem refused extended attributes or ACLs"),
    (255, "ssh: connect to host src port 22: Connection refused",
     "rsync exited with 255: ssh failed (connection or authentication)"),
    (12, "", "rsync exited with 12: error in rsync protocol data stream (often: rsync missing or failing on "
             "the other side)"),
    (99, "", "rsync exited with 99: failed"),
])
def test_run_rsync_failure_never_reported_as_success(code: int, stderr: str, message: str) -> None:
    with pytest.raises(TransferError) as ei:
        transfer.run_rsync(FakeRunner(code, STATS_327, stderr), ("rsync",), None)  # type: ignore[arg-type]
    assert ei.value.message == message
    assert ei.value.exit_code == 8
    assert len(ei.value.detail.splitlines()) <= 15
    if stderr:
        assert ei.value.detail.splitlines()[-1] == stderr.strip().splitlines()[-1]


# --- a tar stream's result -----------------------------------------------------------------------------

def test_parse_streamed_clean() -> None:
    s = transfer.parse_streamed('{"pipeline": [0, 0]}\n', "Total bytes read: 333271040 (318MiB, 78MiB/s)\n", 0)
    assert s.clean and s.codes == (0, 0) and s.bytes == 333271040


@pytest.mark.parametrize(("out", "err", "code", "why"), [
    ('{"pipeline": [1, 0]}', "tar: ./var/log/x: file changed as we read it\nTotal bytes read: 10240", 1,
     "sending tar exited with 1 (a file changed or vanished while it read it): Total bytes read: 10240"),
    ('{"pipeline": [127, 2]}', "sh: 1: tar: not found\ntar: This does not look like a tar archive", 127,
     "sending tar exited with 127 (tar not found on the source); extracting tar exited with 2: "
     "tar: This does not look like a tar archive"),
    ("", "Traceback ...\nOSError: boom", 1, "the stream did not run (exit 1): OSError: boom"),
])
def test_parse_streamed_unclean_says_why(out: str, err: str, code: int, why: str) -> None:
    s = transfer.parse_streamed(out, err, code)
    assert not s.clean and s.why() == why


def test_run_stream_stopped_by_the_supervisor_is_a_transfer_error() -> None:
    with pytest.raises(TransferError, match="stopped by qrmfs's storage-side supervisor"):
        transfer.run_stream(Runner(), ["sh", "-c", "echo 'qrmfs agent: stopped ssh: x' >&2; exit 125"], None)


def test_run_stream_whose_connection_was_cut_fails_without_a_repair() -> None:
    """No ends reported (our ssh to the storage server cut: 255): the copy fails, saying why; no rsync repair is
    tried over a connection (and a lock) that is gone."""
    with pytest.raises(TransferError, match="exited with 255: ssh failed") as ei:
        transfer.run_stream(Runner(), ["sh", "-c", "echo 'Connection to storage closed by remote host.' >&2; "
                                                   "exit 255"], None)
    assert "closed by remote host" in ei.value.detail
    s = transfer.run_stream(Runner(), ["sh", "-c", "echo '{\"pipeline\": [255, 2]}'; exit 255"], None)
    assert s.codes == (255, 2) and not s.clean  # the source's ssh failed: the ends say so, rsync repairs


def test_a_tar_stream_shows_its_progress_and_keeps_it_out_of_stderr(tmp_path: Path) -> None:
    """The extracting tar's checkpoint lines (real GNU tar, 25 MB through a pipe) reach the progress callback
    as bytes and rate; the stderr kept for messages holds only what tar says otherwise (its totals)."""
    from qrmfs.argv import tar_extract_argv
    from qrmfs.runner import Runner

    src, dest = tmp_path / "src", tmp_path / "dest"
    src.mkdir()
    dest.mkdir()
    (src / "big").write_bytes(os.urandom(25 * 2**20))
    extract = shlex.join(tar_extract_argv(str(dest), progress=True))
    script = f"tar --create --file=- --directory {shlex.quote(str(src))} . | {extract}"
    seen: list[tuple[int, int, str]] = []
    got = transfer.run_stream(Runner(), ["sh", "-c", script + '; echo \'{"pipeline": [0, 0]}\''], None,
                              lambda done, pct, rate: seen.append((done, pct, rate)))
    assert (dest / "big").read_bytes() == (src / "big").read_bytes()
    assert len(seen) >= 2 and [d for d, _p, _r in seen] == sorted(d for d, _p, _r in seen)
    assert 990 * 10240 <= seen[0][0] <= 1000 * 10240 and all(p == -1 and r.endswith("/s") for _d, p, r in seen)
    assert got.codes == (0, 0) and got.bytes is not None and got.bytes > 25 * 2**20
    assert "qrmfs-progress" not in got.stderr


@pytest.mark.parametrize("line,want", [
    ("tar: qrmfs-progress r: 20469760 (20MiB, 52MiB/s)", (20469760, "52MiB/s")),
    ("tar: qrmfs-progress r: 0 (0B, 0B/s)", (0, "0B/s")),
])
def test_parse_tar_progress(line: str, want: tuple[int, str]) -> None:
    assert transfer.parse_tar_progress(line) == want


@pytest.mark.parametrize("line", ["Total bytes read: 5 (5B, 1B/s)", "tar: ./x: Cannot open", "qrmfs-progress r: 5"])
def test_parse_tar_progress_other_lines(line: str) -> None:
    assert transfer.parse_tar_progress(line) is None
