#!/usr/bin/env python3
"""Make the lab source's fixture area: every kind of file that is hard to copy faithfully.

Run at container start (docker image layers would drop ACLs, most xattrs and sockets).
The list of cases is also what the e2e tests compare between source and image: keep FIXTURE_CASES in step.
"""

import os
import socket
import stat
import subprocess
import sys

FOREIGN_UID, FOREIGN_GID = 4242, 4343  # exist on no lab host


def main(root: str) -> None:
    os.makedirs(root, exist_ok=True)
    os.chdir(root)

    # hard links (three names, one inode) and a hard link across directories
    os.makedirs("hardlinks/sub", exist_ok=True)
    with open("hardlinks/a", "w") as f:
        f.write("one inode, three names\n")
    os.link("hardlinks/a", "hardlinks/b")
    os.link("hardlinks/a", "hardlinks/sub/c")

    # POSIX ACLs: an access ACL on a file, access + default ACLs on a directory
    with open("acl-file", "w") as f:
        f.write("acl\n")
    subprocess.run(["setfacl", "-m", f"u:{FOREIGN_UID}:rwx,g:{FOREIGN_GID}:r", "acl-file"], check=True)
    os.makedirs("acl-dir", exist_ok=True)
    subprocess.run(["setfacl", "-m", f"u:{FOREIGN_UID}:rx", "-d", "-m", f"g:{FOREIGN_GID}:rwx",
                    "acl-dir"], check=True)

    # xattrs: a user attribute and a file capability (what ping needs)
    with open("xattr-file", "w") as f:
        f.write("xattr\n")
    os.setxattr("xattr-file", "user.qrmfs.note", b"kept by rsync -X")
    with open("cap-file", "wb") as f:
        f.write(b"#!/bin/sh\nexit 0\n")
    os.chmod("cap-file", 0o755)
    subprocess.run(["setcap", "cap_net_raw+ep", "cap-file"], check=True)

    # a sparse file: 1 GiB apparent, a few KiB of data in the middle
    with open("sparse", "wb") as f:
        f.truncate(1 << 30)
        f.seek(512 << 20)
        f.write(b"data in the middle of a hole\n")

    # special files
    os.mkfifo("fifo")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind("socket")
    s.close()
    os.mknod("null-device", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.mknod("block-device", 0o660 | stat.S_IFBLK, os.makedev(7, 0))

    # setuid / setgid / sticky
    with open("setuid", "wb") as f:
        f.write(b"#!/bin/sh\nid\n")
    os.chmod("setuid", 0o4755)
    os.makedirs("setgid-dir", exist_ok=True)
    os.chmod("setgid-dir", 0o2775)
    os.makedirs("sticky-dir", exist_ok=True)
    os.chmod("sticky-dir", 0o1777)

    # symlinks: absolute, relative, dangling, to a directory
    os.symlink("/etc/hostname", "link-absolute")
    os.symlink("hardlinks/a", "link-relative")
    os.symlink("does/not/exist", "link-dangling")
    os.symlink("hardlinks", "link-dir")

    # awkward names
    os.makedirs("names", exist_ok=True)
    for name in (b"with space", b"with\nnewline", b"latin1-\xe9t\xe9", b"bad-\xff\xfe-bytes",
                 b"-leading-dash", b"*glob?[x]", b"'quotes\""):
        with open(os.path.join(b"names", name), "w") as f:
            f.write("awkward name\n")

    # owners that exist on no other host
    with open("foreign-owner", "w") as f:
        f.write("uid 4242 gid 4343\n")
    os.chown("foreign-owner", FOREIGN_UID, FOREIGN_GID)
    os.makedirs("foreign-dir", exist_ok=True)
    os.chown("foreign-dir", FOREIGN_UID, FOREIGN_GID)
    os.lchown("link-relative", FOREIGN_UID, FOREIGN_GID)

    # a fixed mtime in the past, to see that times are kept
    os.utime("hardlinks/a", (1_000_000_000, 1_000_000_000))

    with open(".complete", "w") as f:
        f.write("ok\n")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "/srv/fixture")
