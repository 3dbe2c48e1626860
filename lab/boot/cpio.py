"""The kernel's initramfs format (`newc` cpio), written here for the small per-boot archive."""

from __future__ import annotations


def _newc_entry(name: str, mode: int, data: bytes = b"", ino: int = 0, rdev: tuple[int, int] = (0, 0)) -> bytes:
    namez = name.encode() + b"\0"
    fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, rdev[0], rdev[1], len(namez), 0]
    head = b"070701" + b"".join(f"{f:08X}".encode() for f in fields)
    out = head + namez
    out += b"\0" * (-len(out) % 4)
    out += data
    out += b"\0" * (-len(out) % 4)
    return out


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """A cpio archive in the kernel's `newc` format: (path, mode incl. file type, data) entries.

    Character devices carry (major, minor) as data `b"MAJ:MIN"`. Parents must come before children.
    """
    out = b""
    for ino, (name, mode, data) in enumerate(entries, start=1):
        if mode & 0o170000 == 0o020000:
            major, minor = (int(x) for x in data.decode().split(":"))
            out += _newc_entry(name, mode, b"", ino, (major, minor))
        else:
            out += _newc_entry(name, mode, data, ino)
    out += _newc_entry("TRAILER!!!", 0)
    return out + b"\0" * (-len(out) % 512)


def per_boot_archive(script: str | None) -> bytes:
    """The small cpio appended to the base initramfs: /dev/console (for the first messages of /init)
    and, when given, the test script the probe runs once the image is up."""
    entries: list[tuple[str, int, bytes]] = [
        ("dev", 0o040755, b""),
        ("dev/console", 0o020600, b"5:1"),
    ]
    if script is not None:
        entries += [("etc", 0o040755, b""), ("etc/qrmfs-boot", 0o040755, b""),
                    ("etc/qrmfs-boot/test.sh", 0o100755, script.encode())]
    return newc_archive(entries)


def assemble_initrd(base: bytes, extra: bytes) -> bytes:
    """The base initramfs followed by the per-boot cpio. The kernel looks for the next archive only at a
    4-byte boundary (and skips zero bytes), so the compressed base is padded with zeros to 512."""
    return base + b"\0" * (-len(base) % 512) + extra
