"""Boot an image from the lab's NFS storage in a QEMU guest and report whether it reached multi-user.

This machine's kernel has no NFS client, so the only real NFS-root boot is a QEMU guest under software
emulation (`-accel tcg`; KVM guests hang here). The pieces:

* kernel: Debian's current `linux-image-*-amd64` (`apt-cache depends linux-image-amd64`), fetched with
  `apt-get download`, unpacked with `dpkg-deb -x`, `depmod -b`; cached under `state_dir()/boot/kernels/`.
* base initramfs: busybox-static + the NIC and NFSv4 modules (dependency closure from modules.dep) +
  `lab/bootkit/` (its /init, the probe), packed with `cpio -H newc` and gzip; cached under
  `state_dir()/boot/` keyed by kernel version and a hash of the bootkit, busybox and this format.
* per boot, a second tiny cpio (written here) is appended: /dev/console and the optional test script.
* the guest's network is QEMU user networking with `restrict=on`: it reaches nothing but the lab's
  NFS server, through a guestfwd of 10.0.2.100:2049 to the storage container's 2049 (one relay process
  per connection, `lab/bootkit/relay.py`). So a booted image cannot wander onto other networks.
* the probe: the initramfs moves a tmpfs /run into the new root before switch_root, holding a transient
  unit (`/run/systemd/system/qrmfs-probe.service`, wanted by and ordered after multi-user.target). It
  prints `QRMFS-PROBE ...` lines on ttyS0 (reached + uptime, final system state, failed units, the test
  script's output as `QRMFS-OUT` lines) and powers off. Nothing is written into the image.

`boot()` streams the serial console into a log file under `state_dir()/boot/logs/` and reacts to those
markers: no fixed sleeps; QEMU is killed on timeout (and on any error or interrupt).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import re
import selectors
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .images import LabError
from .paths import state_dir

BOOTKIT = Path(__file__).resolve().parent / "bootkit"
BOOTKIT_FORMAT = "qrmfs-bootkit-1"  # bump when the way the initramfs is assembled changes
KERNEL_META = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
QEMU = "qemu-system-x86_64"

DEFAULT_MAC = "52:54:00:12:34:56"  # QEMU's own default
GUEST_IP, GUEST_GW = "10.0.2.15/24", "10.0.2.2"
NFS_GUEST_ADDR = "10.0.2.100"  # the storage server as the guest sees it (guestfwd)
NFS_PORT = 2049
NFS_OPTS = f"vers=4.1,port={NFS_PORT}"

PROBE, OUT, BOOTMARK = "QRMFS-PROBE", "QRMFS-OUT", "QRMFS-BOOT"
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-]+$")
HOSTNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,62}$")
REACHED_STATE = "multi-user.target"
KEEP_LOGS = 200  # console logs kept under state_dir()/boot/logs (oldest removed first)


# ---------------------------------------------------------------------------------------------------------
# Pure parts (unit-tested without docker or QEMU)


def parse_kernel_depends(apt_cache_output: str) -> str | None:
    """The `linux-image-<version>-amd64` package named by `apt-cache depends linux-image-amd64`."""
    for line in apt_cache_output.splitlines():
        m = re.match(r"^\s*\|?Depends:\s*(linux-image-\d\S*-amd64)\s*$", line)
        if m:
            return m.group(1)
    return None


def module_load_order(modules_dep: str, wanted: list[str], builtin: str = "") -> list[str]:
    """Module paths (relative to /lib/modules/VER) to insmod so that each comes after its dependencies.

    `modules_dep` is modules.dep's text, `builtin` modules.builtin's; wanted names use `_` or `-`.
    Modules built into the kernel are skipped; an unknown module is an error.
    """
    def name_of(path: str) -> str:
        base = path.rsplit("/", 1)[-1]
        return re.sub(r"\.ko(\.(xz|zst|gz))?$", "", base).replace("-", "_")

    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.splitlines():
        if ":" not in line:
            continue
        mod, rest = line.split(":", 1)
        mod = mod.strip()
        deps[mod] = rest.split()
        by_name[name_of(mod)] = mod
    builtins = {name_of(line.strip()) for line in builtin.splitlines() if line.strip()}

    order: list[str] = []
    done: set[str] = set()

    def visit(mod: str, stack: tuple[str, ...]) -> None:
        if mod in done:
            return
        if mod in stack:
            raise LabError(f"module dependency cycle: {' -> '.join((*stack, mod))}")
        for dep in deps.get(mod, []):
            visit(dep, (*stack, mod))
        done.add(mod)
        order.append(mod)

    for want in wanted:
        key = want.replace("-", "_")
        if key in by_name:
            visit(by_name[key], ())
        elif key not in builtins:
            raise LabError(f"kernel module {want} is neither in modules.dep nor built in")
    return order


def read_module_list(text: str) -> list[str]:
    """Module names from a bootkit list: one a line, `#` comments."""
    return [ln.split("#", 1)[0].strip() for ln in text.splitlines() if ln.split("#", 1)[0].strip()]


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


def validate_node_id(node_id: int | str | None) -> str | None:
    if node_id is None:
        return None
    s = str(node_id)
    if not NODE_ID_RE.match(s):
        raise LabError(f"node id {s!r}: use letters, digits, '_' and '-' only")
    return s


def node_mac(node_id: int | str | None) -> str:
    """A stable, locally administered MAC per node (QEMU's default when there is no node id)."""
    nid = validate_node_id(node_id)
    if nid is None:
        return DEFAULT_MAC
    h = hashlib.sha256(f"qrmfs-node:{nid}".encode()).digest()
    return "52:54:00:" + ":".join(f"{b:02x}" for b in h[:3])


def node_uuid(node_id: int | str | None) -> str:
    """A stable SMBIOS UUID per node, as real machines have: systemd derives a VM's fallback machine-id
    from it, so nodes without qrmfs-init still differ (and never match the image's own id)."""
    nid = validate_node_id(node_id)
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"qrmfs-lab-node:{nid if nid is not None else '-'}"))


def kernel_cmdline(nfs_server: str, image_path: str, node_id: int | str | None = None,
                   hostname: str | None = None, probe: bool = True, extra: tuple[str, ...] = ()) -> str:
    """The guest kernel's command line: console on ttyS0, the NFS root for the initramfs, node identity."""
    if not image_path.startswith("/") or any(c.isspace() for c in image_path):
        raise LabError(f"image path {image_path!r} must be absolute and contain no white space")
    args = ["console=ttyS0,115200", "panic=-1", "net.ifnames=0",
            f"qrmfs.root={nfs_server}:{image_path}", f"qrmfs.nfsopts={NFS_OPTS}",
            f"qrmfs.ip={GUEST_IP}", f"qrmfs.gw={GUEST_GW}"]
    if not probe:
        args.append("qrmfs.probe=0")
    nid = validate_node_id(node_id)
    if nid is not None:
        args.append(f"qrmfs.node={nid}")
    if hostname is not None:
        if not HOSTNAME_RE.match(hostname):
            raise LabError(f"hostname {hostname!r} is not a valid host name")
        args.append(f"qrmfs.hostname={hostname}")
    args.extend(extra)
    return " ".join(args)


def relay_command(storage_address: str, port: int = NFS_PORT, python: str = sys.executable) -> str:
    """The per-connection command QEMU's guestfwd runs to reach the storage server's NFS port."""
    for part in (python, str(BOOTKIT / "relay.py")):
        if any(c.isspace() or c in "'\",\\" for c in part):
            raise LabError(f"path {part!r} cannot be used in a QEMU guestfwd command (spaces, quotes or commas)")
    return f"{python} {BOOTKIT / 'relay.py'} {storage_address} {port}"


def qemu_argv(kernel: str, initrd: str, cmdline: str, storage_address: str, *, mac: str = DEFAULT_MAC,
              machine_uuid: str | None = None, memory: int = 1024, smp: int = 2,
              nic: str = "virtio-net-pci") -> list[str]:
    """QEMU under TCG, serial console on stdout, isolated user networking with one way out: NFS."""
    netdev = (f"user,id=net0,restrict=on,"
              f"guestfwd=tcp:{NFS_GUEST_ADDR}:{NFS_PORT}-cmd:{relay_command(storage_address)}")
    return [QEMU, "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64", "-m", str(memory), "-smp", str(smp),
            *(["-uuid", machine_uuid] if machine_uuid else []),
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
            "-chardev", "stdio,id=serial0,signal=off", "-serial", "chardev:serial0",
            "-netdev", netdev, "-device", f"{nic},netdev=net0,mac={mac}",
            "-kernel", kernel, "-initrd", initrd, "-append", cmdline]


@dataclass
class SerialReport:
    """What the serial console said, as far as the markers of /init and the probe go."""

    mounted: bool = False
    switched_to: str | None = None
    fatal: str | None = None
    reached: bool = False
    uptime: float | None = None
    system_state: str | None = None
    failed_units: list[str] = field(default_factory=list)
    script_started: bool = False
    script_lines: list[str] = field(default_factory=list)
    script_rc: int | None = None
    done: bool = False
    unpack_error: str | None = None  # the kernel could not unpack (all of) the initramfs

    def feed_line(self, raw: str) -> None:
        line = raw.replace("\r", "").rstrip("\n")
        if "Initramfs unpacking failed:" in line and self.unpack_error is None:
            self.unpack_error = line.split("Initramfs unpacking failed:", 1)[1].strip()
        i = line.find(OUT)
        if i >= 0 and self.script_started and self.script_rc is None:
            rest = line[i + len(OUT):]
            self.script_lines.append(rest[1:] if rest.startswith(" ") else rest)
            return
        i = line.find(BOOTMARK + " ")
        if i >= 0:
            msg = line[i + len(BOOTMARK) + 1:].strip()
            if msg.startswith("FATAL "):
                self.fatal = msg[len("FATAL "):]
            elif msg.startswith("mounted "):
                self.mounted = True
            elif msg.startswith("switch_root "):
                self.switched_to = msg.split(" ", 1)[1]
            return
        i = line.find(PROBE + " ")
        if i < 0:
            return
        msg = line[i + len(PROBE) + 1:].strip()
        if msg.startswith("reached "):
            self.reached = True
            m = re.search(r"uptime=([0-9.]+)", msg)
            self.uptime = float(m.group(1)) if m else None
        elif msg.startswith("state="):
            self.system_state = msg.split()[0].split("=", 1)[1]
        elif msg.startswith("failed-unit "):
            self.failed_units.append(msg.split()[1])
        elif msg == "script-begin":
            self.script_started = True
        elif msg.startswith("script-end"):
            m = re.search(r"rc=(-?\d+)", msg)
            self.script_rc = int(m.group(1)) if m else -1
        elif msg == "done":
            self.done = True


def parse_serial(text: str) -> SerialReport:
    report = SerialReport()
    for line in text.splitlines():
        report.feed_line(line)
    return report


# ---------------------------------------------------------------------------------------------------------
# Kernel and initramfs cache


def boot_dir() -> Path:
    d = state_dir() / "boot"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _log(msg: str) -> None:
    print(f"lab boot: {msg}", file=sys.stderr, flush=True)


def _run(argv: list[str], what: str, cwd: Path | None = None) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, cwd=cwd, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).strip().splitlines()[-10:])
        raise LabError(f"{what} failed (exit {r.returncode}): {' '.join(argv)}\n{tail}")
    return r.stdout


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def bootkit_hash() -> str:
    h = hashlib.sha256(BOOTKIT_FORMAT.encode() + b"\0")
    for p in sorted(BOOTKIT.rglob("*")):
        if p.is_file() and "__pycache__" not in p.parts:
            h.update(str(p.relative_to(BOOTKIT)).encode() + b"\0" + p.read_bytes() + b"\0")
    h.update(hashlib.sha256(BUSYBOX.read_bytes()).digest() if BUSYBOX.exists() else b"no-busybox")
    return h.hexdigest()[:12]


def _cached_kernels() -> list[str]:
    kdir = boot_dir() / "kernels"
    found = [p.name for p in kdir.glob("*") if (p / "vmlinuz").is_file() and (p / "kernel.deb").is_file()]
    return sorted(found, key=lambda v: [int(x) if x.isdigit() else x for x in re.split(r"[.-]", v)])


def kernel_package() -> str:
    """The kernel package to boot: $QRMFS_LAB_KERNEL, else what linux-image-amd64 depends on now,
    else (no package lists) the newest kernel already cached."""
    forced = os.environ.get("QRMFS_LAB_KERNEL")
    if forced:
        return forced if forced.startswith("linux-image-") else f"linux-image-{forced}"
    r = subprocess.run(["apt-cache", "depends", KERNEL_META], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL)
    pkg = parse_kernel_depends(r.stdout) if r.returncode == 0 else None
    if pkg:
        return pkg
    cached = _cached_kernels()
    if cached:
        return f"linux-image-{cached[-1]}"
    raise LabError(f"cannot tell which kernel to boot: `apt-cache depends {KERNEL_META}` names none "
                   f"({r.stderr.strip()[-200:]}); run `apt-get update` or set QRMFS_LAB_KERNEL")


def ensure_kernel(pkg: str) -> tuple[str, Path]:
    """(kernel version, its cache dir with vmlinuz and kernel.deb); downloads once."""
    kver = pkg.removeprefix("linux-image-")
    kdir = boot_dir() / "kernels" / kver
    if (kdir / "vmlinuz").is_file() and (kdir / "kernel.deb").is_file():
        return kver, kdir
    _log(f"fetching {pkg} with apt-get download (once)")
    with tempfile.TemporaryDirectory(dir=boot_dir(), prefix=".kernel-") as tmp:
        t = Path(tmp)
        _run(["apt-get", "download", "-q", pkg], f"apt-get download {pkg}", cwd=t)
        debs = list(t.glob("*.deb"))
        if len(debs) != 1:
            raise LabError(f"apt-get download {pkg} left {len(debs)} .deb files")
        root = t / "root"
        _run(["dpkg-deb", "-x", str(debs[0]), str(root)], "dpkg-deb -x")
        vmlinuz = root / "boot" / f"vmlinuz-{kver}"
        if not vmlinuz.is_file():
            raise LabError(f"{pkg} has no boot/vmlinuz-{kver}")
        stage = t / "stage"
        stage.mkdir()
        shutil.copyfile(vmlinuz, stage / "vmlinuz")
        debs[0].rename(stage / "kernel.deb")
        kdir.parent.mkdir(parents=True, exist_ok=True)
        if kdir.exists():
            shutil.rmtree(kdir)
        stage.rename(kdir)
    return kver, kdir


def _modules_root(root: Path, kver: str) -> Path:
    for cand in (root / "lib" / "modules" / kver, root / "usr" / "lib" / "modules" / kver):
        if cand.is_dir():
            return cand
    raise LabError(f"the kernel package has no lib/modules/{kver}")


def build_initramfs(kver: str, kdir: Path, dest: Path) -> None:
    """busybox + the NIC/NFS modules + the bootkit, as a gzip'd newc cpio at `dest`."""
    if not BUSYBOX.is_file():
        raise LabError(f"{BUSYBOX} is missing: install busybox-static (scripts/setup.sh does)")
    wanted = read_module_list((BOOTKIT / "modules.txt").read_text())
    _log(f"building the initramfs for {kver} ({len(wanted)} modules + dependencies)")
    with tempfile.TemporaryDirectory(dir=boot_dir(), prefix=".initramfs-") as tmp:
        t = Path(tmp)
        root = t / "kernel"
        _run(["dpkg-deb", "-x", str(kdir / "kernel.deb"), str(root)], "dpkg-deb -x")
        mods = _modules_root(root, kver)
        _run(["depmod", "-b", str(mods.parents[2]), kver], "depmod -b")  # BASE/lib/modules/KVER
        builtin = (mods / "modules.builtin").read_text() if (mods / "modules.builtin").exists() else ""
        order = module_load_order((mods / "modules.dep").read_text(), wanted, builtin)

        s = t / "stage"
        for d in ("bin", "dev", "etc/qrmfs-boot", "proc", "sys", "run", "newroot", f"lib/modules/{kver}"):
            (s / d).mkdir(parents=True, exist_ok=True)
        shutil.copy2(BUSYBOX, s / "bin" / "busybox")
        shutil.copy2(BOOTKIT / "init", s / "init")
        (s / "init").chmod(0o755)
        for f in ("probe.sh", "qrmfs-probe.service"):
            shutil.copy2(BOOTKIT / f, s / "etc" / "qrmfs-boot" / f)
        loaded = []
        for rel in order:
            src = mods / rel
            if rel.endswith(".ko.xz"):
                import lzma

                rel = rel[:-3]
                data = lzma.decompress(src.read_bytes())
            elif rel.endswith(".ko"):
                data = src.read_bytes()
            else:
                raise LabError(f"cannot load a module compressed like {rel} with busybox insmod")
            dst = s / "lib" / "modules" / kver / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            dst.write_bytes(data)
            loaded.append(rel)
        (s / "etc" / "qrmfs-boot" / "modules.order").write_text("".join(f"{m}\n" for m in loaded))

        files = sorted(str(p.relative_to(s)) for p in s.rglob("*"))
        cpio = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=s,
                              input="\n".join(files).encode() + b"\n", capture_output=True)
        if cpio.returncode != 0:
            raise LabError(f"cpio failed: {cpio.stderr.decode(errors='replace')[-500:]}")
        part = t / "initramfs.cpio.gz"
        with gzip.open(part, "wb", compresslevel=6) as g:
            g.write(cpio.stdout)
        part.replace(dest)


@dataclass
class Prepared:
    kernel_version: str
    vmlinuz: Path
    initramfs: Path
    cold: bool
    seconds: float


def prepare() -> Prepared:
    """Kernel + base initramfs, from the cache when they are there (a lock serialises builders)."""
    t0 = time.monotonic()
    with _locked(boot_dir() / ".lock"):
        pkg = kernel_package()
        kver = pkg.removeprefix("linux-image-")
        kdir = boot_dir() / "kernels" / kver
        cold = not ((kdir / "vmlinuz").is_file() and (kdir / "kernel.deb").is_file())
        kver, kdir = ensure_kernel(pkg)
        initrd = boot_dir() / f"initramfs-{kver}-{bootkit_hash()}.cpio.gz"
        if not initrd.is_file():
            cold = True
            build_initramfs(kver, kdir, initrd)
            # Older bootkits' initramfs files: keep a few (a concurrent boot may still read one).
            others = sorted(boot_dir().glob("initramfs-*.cpio.gz"), key=lambda p: p.stat().st_mtime)
            for old in [p for p in others if p != initrd][:-3]:
                old.unlink(missing_ok=True)
    return Prepared(kver, kdir / "vmlinuz", initrd, cold, time.monotonic() - t0)


# ---------------------------------------------------------------------------------------------------------
# Booting


@dataclass
class BootResult:
    reached: bool                 # the probe ran: the image got to multi-user.target
    state: str                    # "multi-user.target", or what went wrong ("timeout", "initramfs: ...")
    seconds: float                # wall time from QEMU's start to multi-user (or to the failure)
    log_path: str                 # the serial console log
    script_output: str = ""
    failed_units: list[str] = field(default_factory=list)
    system_state: str | None = None   # `systemctl is-system-running` once start-up finished
    guest_uptime: float | None = None  # the guest's uptime when it reached multi-user
    script_rc: int | None = None
    wall_seconds: float = 0.0     # the whole call: preparation, boot, script, shutdown
    prepare_seconds: float = 0.0  # kernel download + initramfs build (cold) or cache look-up (warm)
    cold: bool = False
    clean_shutdown: bool = False  # the guest powered itself off
    nfs_wait_seconds: float = 0.0  # waiting for the storage server to show the image over NFS
    error: str | None = None
    log_tail: str = ""
    image: str = ""
    node_id: str | None = None
    kernel: str = ""

    @property
    def ok(self) -> bool:
        return self.reached and self.error is None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        return d


def visible_in_listing(listing: str, entry: str = "etc") -> bool:
    """An `nfs-ls` listing of the image's root shows `entry` as a directory (a line `d... NAME`)."""
    return any(ln.startswith("d") and ln.rstrip().split(" ")[-1] == entry for ln in listing.splitlines())


def wait_visible(storage_address: str, image_path: str, timeout: float = 150.0) -> tuple[bool, float, str]:
    """Poll the image's root directory over NFSv4 from this machine (libnfs `nfs-ls`) until the server
    lists its `etc` directory.

    nfs-ganesha caches directory entries and attributes (about a minute): an image that was removed
    and made again under the same name can be invisible (NFS4ERR_NOENT) for that long. Booting then
    would fail in confusing ways, so we wait for a real answer instead. Returns (visible, seconds, why).
    The probe lists the image root, which qrmfs never publishes as a symlink: probing a path inside
    the image (such as /sbin, a symlink to usr/sbin in merged-/usr images) would let libnfs resolve a
    symlink, which it does with garbage after the target (`usr/sbin1`), failing at random.
    """
    if shutil.which("nfs-ls") is None:
        return True, 0.0, "nfs-ls not installed: not checked"
    url = f"nfs://{storage_address}{image_path}?version=4"
    t0 = time.monotonic()
    last = ""
    while True:
        try:
            r = subprocess.run(["nfs-ls", url], capture_output=True, text=True, timeout=30,
                               stdin=subprocess.DEVNULL)
            if r.returncode == 0 and visible_in_listing(r.stdout):
                return True, time.monotonic() - t0, ""
            last = (r.stderr or r.stdout).strip() or "no etc directory listed"
        except subprocess.TimeoutExpired:
            last = "nfs-ls timed out"
        if time.monotonic() - t0 > timeout:
            return False, time.monotonic() - t0, last[-300:]
        time.sleep(1.0)


ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def _tail(path: Path, lines: int = 40) -> str:
    """The end of the console log, without colour codes and carriage returns."""
    try:
        text = path.read_bytes().decode(errors="replace").replace("\r", "")
    except OSError:
        return ""
    return "\n".join(ANSI.sub("", text).splitlines()[-lines:])


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _log_path(image_path: str, node_id: str | None) -> Path:
    d = boot_dir() / "logs"
    d.mkdir(parents=True, exist_ok=True)
    logs = sorted(d.glob("*.log"), key=lambda p: p.stat().st_mtime)
    for old in logs[:max(0, len(logs) - KEEP_LOGS + 1)]:
        old.unlink(missing_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", image_path.rstrip("/").rsplit("/", 1)[-1] or "root")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return d / f"{name}-node{node_id or 'none'}-{stamp}-{os.getpid()}.log"


def judge(report: SerialReport, *, timed_out: bool, returncode: int | None, timeout: float,
          script_given: bool = False, clean_poweroff: bool = False, clean_shutdown: bool = True,
          shutdown_timeout: float = 60, qemu_err: str = "") -> tuple[str, str | None]:
    """(state, error) of a boot from what the console said and how QEMU ended; error None = success."""
    unpack = (f" (the kernel could not unpack the initramfs: {report.unpack_error})"
              if report.unpack_error else "")
    if report.reached:
        if timed_out and not report.done:
            what = "the test script did not finish" if report.script_started else "the probe did not finish"
            return REACHED_STATE, f"timeout after {timeout:.0f}s: the guest reached {REACHED_STATE} but {what}"
        if clean_poweroff and not clean_shutdown:
            return REACHED_STATE, (f"the orderly shutdown did not finish within {shutdown_timeout:.0f}s "
                                   "(see the end of the console log)")
        if script_given and report.script_rc is None:
            what = ("the test script did not run" if not report.script_started
                    else "the guest stopped before the test script finished")
            return REACHED_STATE, what + unpack
        if not report.done:
            return REACHED_STATE, f"the guest stopped (QEMU exit {returncode}) before the probe finished"
        return REACHED_STATE, None
    if report.fatal:
        return f"initramfs: {report.fatal}", f"the initramfs gave up: {report.fatal}"
    if timed_out:
        stage = (f"after switch_root to {report.switched_to}" if report.switched_to
                 else "after mounting the NFS root" if report.mounted else "before the NFS root was mounted")
        return "timeout", f"no {REACHED_STATE} within {timeout:.0f}s ({stage})" + unpack
    error = f"QEMU exited with {returncode} before the guest reached {REACHED_STATE}" + unpack
    if qemu_err:
        error += f": {qemu_err[-500:]}"
    return f"qemu exited ({returncode})", error


def boot(info: dict[str, Any], image_path: str, node_id: int | str | None = None, script: str | None = None,
         timeout: float = 300, *, hostname: str | None = None, memory: int = 1024, smp: int = 2,
         shutdown_timeout: float = 60, mac: str | None = None, clean_poweroff: bool = False,
         visible_timeout: float = 150) -> BootResult:
    """Boot `image_path` (e.g. /exports/img1 on the lab's storage) in QEMU and report what happened.

    `script`, when given, is run by /bin/sh inside the booted guest once it is up; its output and exit
    code come back in the result. `timeout` bounds the boot and the script; after the probe is done the
    guest gets `shutdown_timeout` seconds to power off before QEMU is killed. The guest powers off with
    `systemctl poweroff --force` unless `clean_poweroff` asks for an orderly shutdown (which an image
    whose networking.service takes eth0 down cannot finish on an NFS root).
    """
    t_call = time.monotonic()
    if shutil.which(QEMU) is None:
        raise LabError(f"{QEMU} is not installed (Debian qemu-system-x86; `make setup` installs it)")
    nid = validate_node_id(node_id)
    storage = info["hosts"]["storage"]["address"]
    extra = ("qrmfs.poweroff=clean",) if clean_poweroff else ()
    cmdline = kernel_cmdline(NFS_GUEST_ADDR, image_path, nid, hostname, extra=extra)
    prep = prepare()
    log_path = _log_path(image_path, nid)
    result = BootResult(reached=False, state="not started", seconds=0.0, log_path=str(log_path),
                        image=image_path, node_id=nid, kernel=prep.kernel_version, cold=prep.cold,
                        prepare_seconds=round(prep.seconds, 2))
    visible, waited, why = wait_visible(storage, image_path, visible_timeout)
    result.nfs_wait_seconds = round(waited, 2)
    if not visible:
        result.state = "image not visible over NFS"
        result.log_path = ""  # QEMU never started
        result.error = (f"{storage}:{image_path} (its /etc) is not visible over NFSv4 after {waited:.0f}s "
                        f"({why}); "
                        "does the image exist on the storage server?")
        result.wall_seconds = round(time.monotonic() - t_call, 2)
        return result
    report = SerialReport()
    with tempfile.TemporaryDirectory(dir=boot_dir(), prefix=".run-") as tmp:
        initrd = Path(tmp) / "initrd"
        initrd.write_bytes(assemble_initrd(prep.initramfs.read_bytes(), per_boot_archive(script)))
        stderr_path = Path(tmp) / "qemu.stderr"
        argv = qemu_argv(str(prep.vmlinuz), str(initrd), cmdline, storage, mac=mac or node_mac(nid),
                         machine_uuid=node_uuid(nid), memory=memory, smp=smp)
        with open(log_path, "wb") as log, open(stderr_path, "wb") as err:
            t0 = time.monotonic()
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err)
            try:
                timed_out = _watch(proc, log, report, t0 + timeout, shutdown_timeout, result, t0)
            finally:
                _stop(proc)
            end = time.monotonic()
        qemu_err = stderr_path.read_text(errors="replace").strip()

    result.reached = report.reached
    result.guest_uptime = report.uptime
    result.system_state = report.system_state
    result.failed_units = report.failed_units
    result.script_rc = report.script_rc
    result.script_output = "".join(f"{ln}\n" for ln in report.script_lines)
    result.clean_shutdown = report.done and not timed_out and proc.returncode == 0
    if not report.reached:
        result.seconds = round(end - t0, 2)
    result.state, result.error = judge(report, timed_out=timed_out, returncode=proc.returncode,
                                       timeout=timeout, script_given=script is not None,
                                       clean_poweroff=clean_poweroff, clean_shutdown=result.clean_shutdown,
                                       shutdown_timeout=shutdown_timeout, qemu_err=qemu_err)
    if result.error:
        result.log_tail = _tail(log_path)
    result.wall_seconds = round(time.monotonic() - t_call, 2)
    return result


def _watch(proc: subprocess.Popen[bytes], log: Any, report: SerialReport, deadline: float,
           shutdown_timeout: float, result: BootResult, t0: float) -> bool:
    """Stream the console into `log` and `report` until the guest is done and off, or time runs out.

    Returns True when the deadline (or the shutdown grace after the probe finished) passed."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    sel = selectors.DefaultSelector()
    sel.register(fd, selectors.EVENT_READ)
    pending = b""
    shutdown_deadline: float | None = None
    try:
        while True:
            now = time.monotonic()
            limit = shutdown_deadline if shutdown_deadline is not None else deadline
            if now >= limit:
                return True
            if not sel.select(timeout=min(limit - now, 5.0)):
                continue
            data = os.read(fd, 65536)
            if not data:  # QEMU closed the console: it exited
                if pending:
                    report.feed_line(pending.decode(errors="replace"))
                proc.wait()
                return False
            log.write(data)
            log.flush()
            pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                was = report.reached
                report.feed_line(line.decode(errors="replace"))
                if report.reached and not was:
                    result.seconds = round(time.monotonic() - t0, 2)
            if (report.done or report.fatal) and shutdown_deadline is None:
                shutdown_deadline = time.monotonic() + shutdown_timeout
    finally:
        sel.close()


def parse_target(target: str, info: dict[str, Any]) -> str:
    """`storage:/exports/NAME` (or the storage IP, or a bare NAME) -> the image's path on the storage."""
    storage = info["hosts"]["storage"]
    export_root = storage["export_root"].rstrip("/")
    host, sep, path = target.partition(":")
    if not sep:
        host, path = "storage", target
    if host not in ("storage", storage["address"]):
        raise LabError(f"{target!r}: the lab boots only from its storage (`storage` or {storage['address']})")
    if not path.startswith("/"):
        path = f"{export_root}/{path}"
    parts = path.rstrip("/").split("/")
    if ".." in parts or "." in parts or not path.startswith(export_root + "/") or len(parts) < 3:
        raise LabError(f"{target!r}: the image must be a directory under {export_root}/")
    return path.rstrip("/")
