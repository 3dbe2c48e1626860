"""Describe a tree exactly (run on a lab host with `python3 - ROOT`): every property a faithful copy keeps.

Prints JSON: {relative path (bytes escaped): {type, mode, uid, gid, size, blocks?, target?, rdev?, xattrs,
links (names sharing the inode)}}. Standard library only.
"""

import json
import os
import stat
import sys

XFS_ACL_NAMES = {"trusted.SGI_ACL_FILE", "trusted.SGI_ACL_DEFAULT"}

root = sys.argv[1].encode()
out = {}
inodes = {}
for dirpath, dirnames, filenames in os.walk(root):
    for name in sorted(dirnames + filenames):
        full = os.path.join(dirpath, name)
        rel = os.path.relpath(full, root).decode("utf-8", "backslashreplace")
        st = os.lstat(full)
        kind = stat.S_IFMT(st.st_mode)
        d = {"type": {stat.S_IFREG: "file", stat.S_IFDIR: "dir", stat.S_IFLNK: "link", stat.S_IFIFO: "fifo",
                      stat.S_IFSOCK: "socket", stat.S_IFCHR: "chr", stat.S_IFBLK: "blk"}[kind],
             "mode": oct(stat.S_IMODE(st.st_mode)), "uid": st.st_uid, "gid": st.st_gid}
        if kind == stat.S_IFREG:
            d["size"] = st.st_size
            d["sparse"] = st.st_blocks * 512 < st.st_size
            d["mtime"] = int(st.st_mtime)
            with open(full, "rb") as f:
                import hashlib
                d["sha256"] = hashlib.sha256(f.read()).hexdigest()
            inodes.setdefault(st.st_ino, []).append(rel)
        if kind == stat.S_IFLNK:
            d["target"] = os.readlink(full).decode("utf-8", "backslashreplace")
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            d["rdev"] = [os.major(st.st_rdev), os.minor(st.st_rdev)]
        if kind != stat.S_IFLNK:
            # XFS lists its on-disk form of a POSIX ACL as trusted.SGI_ACL_* beside system.posix_acl_* (to
            # CAP_SYS_ADMIN): the same ACL, compared through system.posix_acl_*, so it is left out here.
            d["xattrs"] = {k: os.getxattr(full, k, follow_symlinks=False).hex()
                           for k in sorted(os.listxattr(full, follow_symlinks=False))
                           if k not in XFS_ACL_NAMES}
        out[rel] = d
for names in inodes.values():
    for n in names:
        out[n]["links"] = sorted(names)
print(json.dumps(out, sort_keys=True))
