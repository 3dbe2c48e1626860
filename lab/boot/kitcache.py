"""The boot kit's kernel and initramfs, cached under state_dir()/boot/.

* kernel: Debian's current `linux-image-*-amd64` (`apt-cache depends linux-image-amd64`), fetched with
  `apt-get download`, unpacked with `dpkg-deb -x`, `depmod -b`; cached under `state_dir()/boot/kernels/`.
* base initramfs: busybox-static + the NIC and NFSv4 modules (dependency closure from modules.dep) +
  `lab/bootkit/` (its /init, the probes), packed with `cpio -H newc` and gzip; cached under
  `state_dir()/boot/` keyed by kernel version and a hash of the bootkit, busybox and this format.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..images import LabError
from ..paths import state_dir

BOOTKIT = Path(__file__).resolve().parents[1] / "bootkit"
BOOTKIT_FORMAT = "qrmfs-bootkit-2"  # bump when the way the initramfs is assembled changes
KERNEL_META = "linux-image-amd64"
BUSYBOX = Path("/bin/busybox")
PROBE_FILES = ("probe.sh", "qrmfs-probe.service", "probe-sysv.sh")


def parse_kernel_depends(apt_cache_output: str) -> str | None:
    """The `linux-image-<version>-amd64` package named by `apt-cache depends linux-image-amd64`."""
    for line in apt_cache_output.splitlines():
        m = re.match(r"^\s*\|?Depends:\s*(linux-image-\d\S*-amd64)\s*$", line)
        if m:
            return m.group(1)
    return None


def module_load_order(  # noqa: C901 - one topological walk of modules.dep, kept whole to read
                      modules_dep: str, wanted: list[str], builtin: str = "") -> list[str]:
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
        for f in PROBE_FILES:
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
