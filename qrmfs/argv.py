"""Pure builders of every external command line qrmfs runs: argv tuples, asserted exactly by unit tests.

No function here runs anything or reads the environment. Remote commands are one shlex-quoted string.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from .config import SshHost
from .model import ssh_user, ssh_value

# Contents not copied from a live root (the directories themselves are kept, then prepared).
LIVE_EXCLUDES = ("/proc/*", "/sys/*", "/dev/*", "/run/*", "/tmp/*", "/mnt/*", "/media/*",
                 "/lost+found", "/swapfile", "/.qrmfs/nodes")
# Ciphers: OpenSSH's own list, AES-GCM first (its default puts chacha20-poly1305 first). With the AES
# instructions of any server CPU of the last decade, AES-GCM takes about a third less CPU per byte: the
# copies' streams are CPU-bound at both ends (500 MB over ssh here: 1.45-2.0 s -> 1.05-1.26 s). A CPU
# without them would be faster with chacha20-poly1305, still on the list for a server that prefers it.
CIPHERS = ("aes128-gcm@openssh.com,chacha20-poly1305@openssh.com,aes256-gcm@openssh.com,"
           "aes128-ctr,aes192-ctr,aes256-ctr")
SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", "ConnectTimeout=10",
               "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", f"Ciphers={CIPHERS}")


def ssh_options(h: SshHost, *, identity: str | None = None, known_hosts: str | None = None,
                forward_agent: bool = False, control: str | None = None,
                known_hosts_only: bool = False) -> tuple[str, ...]:
    """control: the socket of a master connection (ssh_master_argv) to reuse; without a master there,
    ssh connects on its own (ControlMaster=no never starts one).
    known_hosts_only: trust the keys of known_hosts and nothing else (not the host's global known_hosts): a
    pinned source key.
    Every value that can hold a path or a name is checked by model.ssh_value: ssh splits `-o` values such
    as UserKnownHostsFile on white space and expands '%' in them, so an unsafe one raises UsageError."""
    opts: list[str] = [*SSH_OPTIONS, "-p", str(h.port), "-l", ssh_user(h.user)]
    if control:
        opts += ["-o", "ControlMaster=no", "-o", f"ControlPath={ssh_value(control, 'ssh ControlPath')}"]
    if identity:
        opts += ["-i", ssh_value(identity, "ssh identity file", own_word=True)]
    if known_hosts:
        opts += ["-o", f"UserKnownHostsFile={ssh_value(known_hosts, 'ssh known_hosts file')}"]
        if known_hosts_only:
            opts += ["-o", "GlobalKnownHostsFile=/dev/null"]
    if forward_agent:
        opts += ["-A"]
    return tuple(opts)


def ssh_argv(h: SshHost, remote: Sequence[str], *, identity: str | None = None,  # noqa: PLR0913 - ssh's options
             known_hosts: str | None = None, forward_agent: bool = False, control: str | None = None,
             known_hosts_only: bool = False) -> tuple[str, ...]:
    """ssh to h running `remote` (an argv, quoted into one string for the remote shell)."""
    return ("ssh", *ssh_options(h, identity=identity, known_hosts=known_hosts, forward_agent=forward_agent,
                                control=control, known_hosts_only=known_hosts_only), "--", h.address,
            shlex.join(remote))


def ssh_master_argv(h: SshHost, control: str, *, identity: str | None = None,  # ssh's options
                    known_hosts: str | None = None, remote: Sequence[str] = (),
                    forward_agent: bool = False) -> tuple[str, ...]:
    """A master connection that later ssh calls with the same control socket share (no new handshake);
    with `remote`, it runs that command too (the agent session), else none (-N). forward_agent: the master
    forwards its $SSH_AUTH_SOCK to the sessions that ask (`ssh -A` through it): give it qrmfs's own agent."""
    return ("ssh", *ssh_options(h, identity=identity, known_hosts=known_hosts, forward_agent=forward_agent),
            "-o", "ControlMaster=yes",
            "-o", f"ControlPath={ssh_value(control, 'ssh ControlPath')}", "-o", "ControlPersist=no",
            *(() if remote else ("-N",)), "--", h.address, *((shlex.join(remote),) if remote else ()))


def rsync_rsh(h: SshHost, *, identity: str | None = None, known_hosts: str | None = None,
              known_hosts_only: bool = False) -> str:
    """The -e value for rsync: rsync splits it itself and honours the quotes."""
    return shlex.join(["ssh", *ssh_options(h, identity=identity, known_hosts=known_hosts,
                                           known_hosts_only=known_hosts_only)])


# The xattrs rsync leaves alone, on both sides (s: not sent, r: never deleted, even with --delete-excluded): the
# system.* namespace (POSIX ACLs, which -A copies), and XFS's own copy of each ACL, which XFS shows root as
# trusted.SGI_ACL_FILE / SGI_ACL_DEFAULT. Without these rules rsync -X deletes that "extra" xattr on an XFS
# receiver, which deletes the ACL itself: every update of an image on XFS lost and re-set its ACLs in turn.
XATTR_FILTERS = ("--filter=-xs system.*", "--filter=-xr system.*",
                 "--filter=-xs trusted.SGI_*", "--filter=-xr trusted.SGI_*")


def rsync_argv(src: str, dest: str, *,  # noqa: PLR0913 - keyword-only flags of one command line
               excludes: Sequence[str] = (), rsh: str | None = None,
               progress: bool = False, live_root: bool = True, drift: bool = False,
               delete: bool = False, whole_list: bool = False) -> tuple[str, ...]:
    """rsync with full fidelity: hard links, ACLs, xattrs, sparse files, numeric ids, devices and specials,
    one filesystem, the live-root excludes, then the operator's -e excludes (anchored at the source root).
    drift: the same comparison as a dry run that lists each difference and changes nothing.
    delete: the destination already holds a tree (an update's copy of the image): what the source no longer
    has, or what is excluded now, is deleted, so the result equals a fresh copy; each change is itemized so
    the generation can say what changed. A changed file is sent whole (--whole-file), as rsync does between
    local paths: its delta algorithm would read the old copy and send its block checksums first, which on a
    storage server's network costs more than it saves (an update with 1% of 100k small files changed: 2.2 s
    -> 1.8 s, 4 alternating pairs); it would save bytes only for big files changed in a few places, which a
    root filesystem's updates seldom are (and the preparation empties logs).
    Comparing a tree with a tree (drift, delete), times are compared to the nanosecond (--modify-window=-1):
    rsync's quick check otherwise misses a file rewritten in the same second with the same size.
    whole_list: rsync sends the whole file list first (--no-inc-recursive) instead of directory by directory:
    a pass over a tree it mostly finds unchanged takes 10-12% less time, and each end holds the list (about
    45 bytes an entry here: copyplan.whole_list says when)."""
    argv = ["rsync", "-aHAXS", "--numeric-ids", "--one-file-system"]
    if whole_list:
        argv += ["--no-inc-recursive"]
    argv += ["--dry-run", "--itemize-changes", "--delete"] if drift else ["--stats"]
    if delete and not drift:
        argv += ["--delete", "--delete-excluded", "--itemize-changes", "--whole-file"]
    if drift or delete:
        argv += ["--modify-window=-1"]
    if progress and not drift:
        argv += ["--info=progress2"]
    argv += XATTR_FILTERS
    for e in (*(LIVE_EXCLUDES if live_root else ()), *excludes):
        argv += [f"--exclude={e}"]
    if rsh:
        argv += ["-e", rsh]
    argv += [src.rstrip("/") + "/", dest.rstrip("/") + "/"]
    return tuple(argv)


# What a tar stream keeps, on both ends: xattrs of every namespace (GNU tar extracts only user.* unless told),
# POSIX ACLs, numeric owners; the POSIX format keeps sub-second times and long names.
# XFS's own copies of ACLs (trusted.SGI_ACL_*, see XATTR_FILTERS) are left out: --acls carries the ACLs.
TAR_FIDELITY = ("--format=posix", "--xattrs", "--xattrs-include=*", "--xattrs-exclude=trusted.SGI_*", "--acls",
                "--numeric-owner")


def tar_pattern(rsync_exclude: str) -> str | None:
    """An rsync exclude as a tar exclude with the same meaning (tar anchored, `*` not matching '/'), or None
    when tar cannot say it: only patterns anchored at the root, without rsync's own syntax (`**`, a trailing
    '/' for directories only, backslash escapes)."""
    e = rsync_exclude
    if not e.startswith("/") or e == "/" or e.endswith("/") or "**" in e or "\\" in e:
        return None
    return "." + e


def tar_create_argv(src: str, *, excludes: Sequence[str] = (), live_root: bool = True) -> tuple[str, ...]:
    """tar writing the tree at src to stdout: holes found with SEEK_HOLE and sent as holes (--sparse), hard
    links, devices, xattrs, ACLs, numeric ids; one filesystem; the same excludes as rsync_argv (each must pass
    tar_pattern: ValueError otherwise)."""
    argv = ["tar", "--create", "--file=-", "--sparse", *TAR_FIDELITY, "--one-file-system",
            "--anchored", "--no-wildcards-match-slash"]
    for e in (*(LIVE_EXCLUDES if live_root else ()), *excludes):
        t = tar_pattern(e)
        if t is None:
            raise ValueError(f"tar cannot express the exclude {e!r}")
        argv += [f"--exclude={t}"]
    argv += ["--directory", src.rstrip("/") or "/", "."]
    return tuple(argv)


TAR_PROGRESS = "qrmfs-progress"  # the word that marks the extracting tar's progress lines on its stderr


def tar_extract_argv(dest: str, *, progress: bool = False) -> tuple[str, ...]:
    """tar reading a stream from stdin into dest (an empty directory), as root: owners, modes with
    setuid/setgid, xattrs, ACLs kept; --totals prints the bytes read on stderr (TAR_TOTALS). progress: a line
    on stderr every 1000 records (10 MB), with the bytes read so far and the rate (transfer.parse_tar_progress)."""
    shown = ("--checkpoint=1000", f"--checkpoint-action=echo={TAR_PROGRESS} %{{r}}T") if progress else ()
    return ("tar", "--extract", "--file=-", *TAR_FIDELITY, "--preserve-permissions", "--same-owner", "--totals",
            *shown, "--directory", dest)


def copy_tree_argv(src: str, entries: Sequence[str], dest: str, *, reflink: bool) -> tuple[str, ...]:
    """cp of the named entries of src into dest, keeping everything cp -a keeps (hard links within the copy,
    modes, owners, times, ACLs, xattrs). reflink: share extents (XFS, btrfs: the agent's probe found they
    work), else cp's own default, `auto`: the data goes through the kernel's copy_file_range, not through cp's
    buffers (`never` does that: 10% slower on a 100k-file ext4 image), and a file system that can share
    extents after all shares them, which keeps each tree independent too (copy on write). Never hard links:
    each generation must stay independent of the others."""
    return ("cp", "-a", f"--reflink={'always' if reflink else 'auto'}", "--no-dereference",
            "-t", dest, "--", *(src.rstrip("/") + "/" + e for e in entries))


def remote_spec(h: SshHost, path: str) -> str:
    """rsync's HOST:PATH (user comes from the -e ssh -l option)."""
    addr = f"[{h.address}]" if ":" in h.address else h.address
    return f"{addr}:{path}"


MOUNT_DIRS_MARK = "# qrmfs: directories"
# One read of the mount table, then which mount points are directories (a bind-mounted FILE, a container's
# /etc/hosts, is copied like any file): mountinfo's own escaped names, decoded for the test only (every
# backslash there starts an octal escape \NNN, which printf %b reads as \0NNN). Fixed text, no input.
NO_SOURCE_DIR = 3  # mounts_argv's exit code when the source path is no directory there
_MOUNTS_SCRIPT = (f"[ -d \"$1\" ] || exit {NO_SOURCE_DIR}; "  # the source path, checked before anything starts
                  "mi=$(cat /proc/self/mountinfo) || exit; "  # one line: whatever the login shell, `sh -c` gets it
                  f"printf '%s\\n' \"$mi\" '{MOUNT_DIRS_MARK}'; "
                  "printf '%s\\n' \"$mi\" | while read -r _ _ _ _ mp _; do "
                  "case $mp in *\\\\*) p=$(printf '%b' \"$(printf '%s' \"$mp\" | sed 's/\\\\/\\\\0/g')\");; "
                  "*) p=$mp;; esac; "
                  "if [ -d \"$p\" ]; then printf '%s\\n' \"$mp\"; fi; done")


def mounts_argv(source_path: str) -> tuple[str, ...]:
    """The source's mount table and its directory mount points, in one command (one ssh); see
    mounts.source_mounts. It exits NO_SOURCE_DIR, having read nothing, when source_path is no directory
    (an argument of the fixed script, never part of it)."""
    return ("sh", "-c", _MOUNTS_SCRIPT, "sh", source_path)


def mount_nfs_argv(server: str, export: str, mountpoint: str, vers: str = "4.1") -> tuple[str, ...]:
    return ("mount", "-t", "nfs", "-o", f"vers={vers},hard", f"{server}:{export}", mountpoint)


def umount_argv(mountpoint: str) -> tuple[str, ...]:
    return ("umount", mountpoint)


def agent_argv(python: str, bootstrap: str) -> tuple[str, ...]:
    return (python, "-c", bootstrap)


def ssh_agent_argv(socket: str) -> tuple[str, ...]:
    """An agent that lives as long as its command, `cat` reading our pipe: when qrmfs ends, however it ends, the
    pipe closes, cat exits, and the agent (which checks on its command every 10 s) exits with our key."""
    return ("ssh-agent", "-a", socket, "cat")


def ssh_add_argv(identity: str) -> tuple[str, ...]:
    return ("ssh-add", "-q", identity)


def ssh_add_forget_argv() -> tuple[str, ...]:
    return ("ssh-add", "-q", "-D")


def keygen_find_argv(known_hosts: str, host: str, port: int) -> tuple[str, ...]:
    """The known_hosts lines for host (and [host]:port), to pin the source's key on the storage side."""
    name = host if port == 22 else f"[{host}]:{port}"
    return ("ssh-keygen", "-F", name, "-f", known_hosts)
