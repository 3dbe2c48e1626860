"""qrmfs/argv.py: every external command line, asserted exactly."""

from __future__ import annotations

import shlex

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrmfs import argv as A
from qrmfs import config
from qrmfs.config import SshHost

BASE_SSH = ("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
            "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4",
            "-o", "Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,"
                  "aes128-ctr,aes192-ctr,aes256-ctr")
LIVE = ("--exclude=/proc/*", "--exclude=/sys/*", "--exclude=/dev/*", "--exclude=/run/*", "--exclude=/tmp/*",
        "--exclude=/mnt/*", "--exclude=/media/*", "--exclude=/lost+found", "--exclude=/swapfile",
        "--exclude=/.qrmfs/nodes")
RSYNC_BASE = ("rsync", "-aHAXS", "--numeric-ids", "--one-file-system", "--stats")
# system.* (ACLs: -A) and XFS's trusted.SGI_ACL_* left alone on both sides, whatever --delete-excluded says
XF = ("--filter=-xs system.*", "--filter=-xr system.*", "--filter=-xs trusted.SGI_*", "--filter=-xr trusted.SGI_*")


# --- ssh ------------------------------------------------------------------------------------------

def test_ssh_argv_defaults() -> None:
    assert A.ssh_argv(SshHost("nas1"), ["cat", "/proc/self/mountinfo"]) == (
        "ssh", *BASE_SSH, "-p", "22", "-l", "root", "--", "nas1", "cat /proc/self/mountinfo")


def test_ssh_argv_all_options() -> None:
    h = SshHost("src.example.org", "admin", 2222)
    assert A.ssh_argv(h, ["true"], identity="/keys/id_ed25519", known_hosts="/keys/known_hosts",
                      forward_agent=True) == (
        "ssh", *BASE_SSH, "-p", "2222", "-l", "admin", "-i", "/keys/id_ed25519",
        "-o", "UserKnownHostsFile=/keys/known_hosts", "-A", "--", "src.example.org", "true")


def test_ssh_argv_forward_agent_off_has_no_dash_a() -> None:
    argv = A.ssh_argv(SshHost("h"), ["true"], identity="/k")
    assert "-A" not in argv
    assert argv[argv.index("-i") + 1] == "/k"


def test_ssh_argv_options_end_before_host() -> None:
    # a host can never be read as an ssh option: "--" always precedes it, and the command is ONE argument
    argv = A.ssh_argv(SshHost("h"), ["echo", "a", "b"])
    assert argv[-3:] == ("--", "h", "echo a b")


AWKWARD = ["rsync", "--exclude=/my dir/*", "it's", 'say "hi"', "a;rm -rf /", "$(reboot)", "`id`", "", "x\ny",
           "back\\slash", "*", "~root", "#comment", "a&b|c>d"]


def test_ssh_argv_quotes_awkward_remote_args() -> None:
    argv = A.ssh_argv(SshHost("h"), AWKWARD)
    assert len(argv) == len(BASE_SSH) + 8  # ssh, options, -p 22 -l root, --, host, ONE command string
    assert shlex.split(argv[-1]) == AWKWARD
    # nothing the remote shell would act on survives unquoted
    assert "'a;rm -rf /'" in argv[-1]
    assert "'$(reboot)'" in argv[-1]


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\x00")), max_size=8))
def test_ssh_argv_remote_round_trips(remote: list[str]) -> None:
    assert shlex.split(A.ssh_argv(SshHost("h"), remote)[-1]) == remote


def test_rsync_rsh_exact() -> None:
    assert A.rsync_rsh(SshHost("src", "op", 2200)) == (
        "ssh -o BatchMode=yes -o StrictHostKeyChecking=yes -o ConnectTimeout=10 -o ServerAliveInterval=15 "
        "-o ServerAliveCountMax=4 -o Ciphers=aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,"
        "aes256-gcm@openssh.com,aes128-ctr,aes192-ctr,aes256-ctr -p 2200 -l op")


def test_rsync_rsh_identity_and_known_hosts_quoted() -> None:
    rsh = A.rsync_rsh(SshHost("src"), identity="/my keys/id", known_hosts="/exports/.img.qrmfs-known_hosts")
    assert shlex.split(rsh) == ["ssh", *BASE_SSH, "-p", "22", "-l", "root", "-i", "/my keys/id",
                                "-o", "UserKnownHostsFile=/exports/.img.qrmfs-known_hosts"]
    assert "-A" not in shlex.split(rsh)  # rsync's own ssh never forwards the agent further


# --- rsync ----------------------------------------------------------------------------------------

def test_rsync_argv_live_root_defaults() -> None:
    assert A.rsync_argv("/", "/exports/.img.qrmfs-staging-1") == (
        *RSYNC_BASE, *XF, *LIVE, "/", "/exports/.img.qrmfs-staging-1/")


def test_rsync_argv_directory_source() -> None:
    # live_root defaults on: a root filesystem in a directory has its own proc/sys/dev contents left out too
    assert A.rsync_argv("/srv/rootfs", "/exports/img") == (*RSYNC_BASE, *XF, *LIVE, "/srv/rootfs/", "/exports/img/")
    assert A.rsync_argv("/srv/rootfs", "/exports/img", live_root=False) == (
        *RSYNC_BASE, *XF, "/srv/rootfs/", "/exports/img/")


def test_rsync_argv_live_root_off_has_no_live_excludes() -> None:
    argv = A.rsync_argv("/", "/d", live_root=False, excludes=["/home"])
    assert argv == (*RSYNC_BASE, *XF, "--exclude=/home", "/", "/d/")


def test_rsync_argv_excludes_after_live_excludes_in_order() -> None:
    argv = A.rsync_argv("/", "/d", excludes=["/var/cache", "/home", "/opt/big dir"])
    assert argv == (*RSYNC_BASE, *XF, *LIVE, "--exclude=/var/cache", "--exclude=/home", "--exclude=/opt/big dir",
                    "/", "/d/")


def test_rsync_argv_progress_and_rsh_positions() -> None:
    rsh = A.rsync_rsh(SshHost("src"))
    argv = A.rsync_argv("src:/", "/exports/.x", excludes=["/home"], rsh=rsh, progress=True, live_root=False)
    assert argv == (*RSYNC_BASE, "--info=progress2", *XF, "--exclude=/home", "-e", rsh, "src:/", "/exports/.x/")


@pytest.mark.parametrize(("src", "dest", "want"), [
    ("/", "/d", ("/", "/d/")),
    ("/srv/root/", "/d/", ("/srv/root/", "/d/")),
    ("/srv/root//", "/d//", ("/srv/root/", "/d/")),
    ("host:/", "/d", ("host:/", "/d/")),
    ("[fd00::1]:/srv/r", "/d", ("[fd00::1]:/srv/r/", "/d/")),
])
def test_rsync_argv_trailing_slashes(src: str, dest: str, want: tuple[str, str]) -> None:
    # rsync copies the CONTENTS of src into dest only with exactly one trailing slash on each
    assert A.rsync_argv(src, dest, live_root=False)[-2:] == want


def test_rsync_argv_full_fidelity_flags_always_present() -> None:
    for kw in ({}, {"progress": True}, {"live_root": False}, {"rsh": "ssh"}):
        argv = A.rsync_argv("/a", "/b", **kw)  # type: ignore[arg-type]
        assert argv[:5] == RSYNC_BASE


# --- remote spec, mounts, keygen -------------------------------------------------------------------

def test_remote_spec_plain_and_ipv6() -> None:
    assert A.remote_spec(SshHost("nas1", "admin"), "/exports/img") == "nas1:/exports/img"
    assert A.remote_spec(SshHost("10.0.0.5"), "/x") == "10.0.0.5:/x"
    assert A.remote_spec(SshHost("fd00::5"), "/exports/img") == "[fd00::5]:/exports/img"
    assert A.remote_spec(SshHost("::1"), "/") == "[::1]:/"


def test_ipv6_storage_from_config_gives_usable_argv() -> None:
    cfg = config.parse({"storage": {"nas6": {"address": "[fd00::5]"}}})
    h = cfg.storage["nas6"].ssh
    assert A.remote_spec(h, "/exports/img") == "[fd00::5]:/exports/img"
    # ssh does not strip brackets: `ssh [::1]` fails with "Could not resolve hostname [::1]"
    assert A.ssh_argv(h, ["true"])[-2] == "fd00::5"
    assert A.keygen_find_argv("/kh", h.address, 22) == ("ssh-keygen", "-F", "fd00::5", "-f", "/kh")


def test_mounts_argv_is_one_fixed_command_that_reads_the_table_once() -> None:
    argv = A.mounts_argv("/srv/a path; rm -rf /")
    assert argv[:2] == ("sh", "-c") and argv[3:] == ("sh", "/srv/a path; rm -rf /")  # an argument, never script
    assert argv[2].count("/proc/self/mountinfo") == 1
    assert "\n" not in argv[2]  # one line: a csh login shell cannot take a newline inside quotes


def test_mount_nfs_argv() -> None:
    assert A.mount_nfs_argv("10.0.0.5", "/exports", "/tmp/qrmfs-nfs-x") == (
        "mount", "-t", "nfs", "-o", "vers=4.1,hard", "10.0.0.5:/exports", "/tmp/qrmfs-nfs-x")
    assert A.mount_nfs_argv("nas", "/srv/e", "/m", vers="3") == (
        "mount", "-t", "nfs", "-o", "vers=3,hard", "nas:/srv/e", "/m")


def test_umount_argv() -> None:
    assert A.umount_argv("/tmp/qrmfs-nfs-x") == ("umount", "/tmp/qrmfs-nfs-x")


def test_keygen_find_argv_port_22_and_other() -> None:
    assert A.keygen_find_argv("/root/.ssh/known_hosts", "src", 22) == (
        "ssh-keygen", "-F", "src", "-f", "/root/.ssh/known_hosts")
    assert A.keygen_find_argv("/kh", "src", 2222) == ("ssh-keygen", "-F", "[src]:2222", "-f", "/kh")


def test_agent_helpers() -> None:
    assert A.agent_argv("python3", "print(1)") == ("python3", "-c", "print(1)")
    assert A.ssh_agent_argv("/tmp/a/agent.sock") == ("ssh-agent", "-a", "/tmp/a/agent.sock", "cat")
    assert A.ssh_add_forget_argv() == ("ssh-add", "-q", "-D")
    assert A.ssh_add_argv("/k/id") == ("ssh-add", "-q", "/k/id")


# --- ssh's own word splitting: every value that can hold a path (issue 10, item 4) -----------------------

@pytest.mark.parametrize("kh", ["/exports/x;touch /tmp/p/.img.qrmfs-known_hosts", "/a b", "/a\tb", "/a%hb",
                                "/a'b", '/a"b', "/a\\b", "-oProxyCommand=x", "/a\nb", ""])
def test_known_hosts_unsafe_for_ssh_is_refused(kh: str) -> None:
    from qrmfs.errors import UsageError

    for build in (lambda: A.ssh_argv(SshHost("nas"), ["true"], known_hosts=kh or None),
                  lambda: A.rsync_rsh(SshHost("nas"), known_hosts=kh or None),
                  lambda: A.ssh_master_argv(SshHost("nas"), "/tmp/m", known_hosts=kh or None)):
        if not kh:
            assert "UserKnownHostsFile" not in " ".join(build())  # none given: no option at all
            continue
        with pytest.raises(UsageError, match="invalid ssh known_hosts file"):
            build()


@given(st.text(max_size=30))
def test_every_ssh_o_value_is_one_word_for_ssh(value: str) -> None:
    """Whatever value comes in, what reaches `-o Key=value` has nothing ssh would split or expand."""
    from qrmfs.errors import UsageError

    try:
        argv = A.ssh_argv(SshHost("nas"), ["true"], known_hosts=value or None, control=value or None)
    except UsageError as e:
        assert "\n" not in e.message
        return
    for a in argv:
        if a.startswith(("UserKnownHostsFile=", "ControlPath=")):
            v = a.split("=", 1)[1]
            assert v and not v.startswith("-")
            assert not any(c.isspace() or c in "'\"\\%" or ord(c) < 32 for c in v)


@pytest.mark.parametrize("user", ["-oProxyCommand=x", "a b", ".x", ""])
def test_ssh_user_unsafe_is_refused(user: str) -> None:
    from qrmfs.errors import UsageError

    with pytest.raises(UsageError, match="invalid ssh user"):
        A.ssh_argv(SshHost("nas", user), ["true"])


@pytest.mark.parametrize("identity", ["-oProxyCommand=x", "/k%h", "/k\ney"])
def test_identity_unsafe_is_refused_but_spaces_are_fine(identity: str) -> None:
    from qrmfs.errors import UsageError

    with pytest.raises(UsageError, match="invalid ssh identity file"):
        A.ssh_argv(SshHost("nas"), ["true"], identity=identity)
    assert "/my keys/id" in A.ssh_argv(SshHost("nas"), ["true"], identity="/my keys/id")


# --- update: the staging copy of the image, rsync --delete ------------------------------------------------

def test_rsync_argv_delete_for_an_update() -> None:
    assert A.rsync_argv("/", "/d", delete=True) == (
        "rsync", "-aHAXS", "--numeric-ids", "--one-file-system", "--stats", "--delete", "--delete-excluded",
        "--itemize-changes", "--whole-file", "--modify-window=-1", *XF, *LIVE, "/", "/d/")
    # the drift check already lists deletions; delete adds nothing to a dry run
    assert A.rsync_argv("/", "/d", drift=True, delete=True) == A.rsync_argv("/", "/d", drift=True)


def test_copy_tree_argv_reflink_or_plain_never_hard_links() -> None:
    argv = A.copy_tree_argv("/exports/img/", ["etc", "-odd name"], "/exports/.img.qrmfs-staging-1", reflink=True)
    assert argv == ("cp", "-a", "--reflink=always", "--no-dereference", "-t", "/exports/.img.qrmfs-staging-1",
                    "--", "/exports/img/etc", "/exports/img/-odd name")
    plain = A.copy_tree_argv("/exports/img", ["etc"], "/s", reflink=False)
    # not `never`: that copies through cp's own buffers, not the kernel's copy_file_range
    assert plain[2] == "--reflink=auto" and "-l" not in plain and "--link" not in plain


# --- first copy: a tar stream with hole detection ----------------------------------------------------------

TAR_LIVE = ("--exclude=./proc/*", "--exclude=./sys/*", "--exclude=./dev/*", "--exclude=./run/*",
            "--exclude=./tmp/*", "--exclude=./mnt/*", "--exclude=./media/*", "--exclude=./lost+found",
            "--exclude=./swapfile", "--exclude=./.qrmfs/nodes")


def test_tar_create_argv_exact() -> None:
    assert A.tar_create_argv("/", excludes=["/var/cache/*"]) == (
        "tar", "--create", "--file=-", "--sparse", "--format=posix", "--xattrs", "--xattrs-include=*",
        "--xattrs-exclude=trusted.SGI_*", "--acls", "--numeric-owner", "--one-file-system", "--anchored",
        "--no-wildcards-match-slash", *TAR_LIVE,
        "--exclude=./var/cache/*", "--directory", "/", ".")
    assert A.tar_create_argv("/srv/img/", live_root=False)[-3:] == ("--directory", "/srv/img", ".")
    assert not any(a.startswith("--exclude") for a in A.tar_create_argv("/srv", live_root=False))


def test_tar_extract_argv_exact() -> None:
    assert A.tar_extract_argv("/exports/.i.qrmfs-staging-1") == (
        "tar", "--extract", "--file=-", "--format=posix", "--xattrs", "--xattrs-include=*",
        "--xattrs-exclude=trusted.SGI_*", "--acls", "--numeric-owner", "--preserve-permissions", "--same-owner",
        "--totals", "--directory",
        "/exports/.i.qrmfs-staging-1")


@pytest.mark.parametrize(("rsync", "tar"), [
    ("/proc/*", "./proc/*"), ("/lost+found", "./lost+found"), ("/var/log/*.gz", "./var/log/*.gz"),
    ("/a b/[0-9]?", "./a b/[0-9]?"),
    # what tar cannot say with rsync's meaning: unanchored, directory-only, `**`, escapes, the root itself
    ("*.log", None), ("var/tmp", None), ("/var/tmp/", None), ("/home/**/cache", None), ("/x/\\*", None),
    ("/", None)])
def test_tar_pattern(rsync: str, tar: str | None) -> None:
    assert A.tar_pattern(rsync) == tar


def test_tar_create_argv_refuses_an_exclude_it_cannot_say() -> None:
    with pytest.raises(ValueError, match="cannot express"):
        A.tar_create_argv("/", excludes=["*.log"])


def test_tar_extract_argv_with_progress_adds_checkpoints_only() -> None:
    plain = A.tar_extract_argv("/exports/.i.qrmfs-staging-1")
    shown = A.tar_extract_argv("/exports/.i.qrmfs-staging-1", progress=True)
    assert [a for a in shown if a not in plain] == ["--checkpoint=1000",
                                                     "--checkpoint-action=echo=qrmfs-progress %{r}T"]
    assert shown[-2:] == ("--directory", "/exports/.i.qrmfs-staging-1")
