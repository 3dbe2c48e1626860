"""Boot a node the openQRM way: openQRM's own initrd script and root-mount, its parameters from the lab's
real openQRM server.

What openQRM 5.3.60 does (src/include/openqrm-server-functions `openqrm_server_create_kernel`, the
nfs-storage plugin's init script, src/etc/templates/openqrm-pxelinux) and what the lab does in its place:

* initrd (initramfs type): openQRM unpacks its initrd template, copies the kernel's NIC (and virtio) modules
  flat into lib/modules/VERSION and installs `openqrm-linuxrc` as /init. The lab does the same with
  openQRM's linuxrc and initrd-devices.conf taken unmodified from ../shared/openqrm-5.3.60; the template
  itself (a tarball openQRM's build downloads) is the lab stand-in: Debian's busybox-static with its
  applets linked, and Debian's bash-static as /bin/bash (linuxrc and root-mount are bash scripts).
* kernel record files: openQRM puts vmlinuz-NAME, System.map-NAME and modules-NAME.tgz (the kernel's whole
  lib/modules tree) where the node fetches them, /openqrm/boot-service/boot/. The lab's modules tarball holds
  only the modules a QEMU node needs (NIC, virtio, NFS client; see MODULES): the whole tree of a Debian
  kernel is some 400 MB that every boot would download and unpack into the node's RAM.
* boot-service: root-mount.nfs-deployment (unmodified) and openqrm-client.tgz. openQRM's client bundle is
  built from binaries that are not in ../shared; the lab's bundle has openQRM's own include/openqrm-functions
  and openqrm-package-functions, and in place of its init script and unit the lab's stand-ins
  (lab/bootkit/openqrm/), which run the lab's boot probe once the node is up.
* PXE: QEMU loads the kernel and the initrd directly and gives them the command line openQRM's pxelinux
  template gives (`id=-1 openqrm=SERVER ... net.ifnames=0`, and `ipappend 3`'s `ip=` and `BOOTIF=`).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import ipaddress
import lzma
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..images import LabError
from ..paths import REPO
from .kitcache import BOOTKIT, BUSYBOX, Prepared, _locked, _modules_root, _run, boot_dir, module_load_order
from .qemu import relay_command

OPENQRM_SRC_ENV = "QRMFS_OPENQRM_SRC"
LINUXRC = "src/etc/templates/openqrm-linuxrc"
ROOT_MOUNT = "src/plugins/nfs-storage/web/root-mount.nfs-deployment"
DEVICES = "src/etc/build.conf/initrd-devices.conf"
CLIENT_INCLUDES = ("src/include/openqrm-functions", "src/include/openqrm-package-functions")
STANDINS = BOOTKIT / "openqrm"
BASH_STATIC = Path("/bin/bash-static")
KIT_FORMAT = "qrmfs-openqrm-kit-2"  # bump when the way the kit is assembled changes

KERNEL_NAME = "qrmfs-lab"          # the kernel record's name (files vmlinuz-NAME, modules-NAME.tgz, ...)
RESOURCE_BASEDIR = "/usr/share"    # openQRM's OPENQRM_RESOURCE_BASE_DIR: the client lives in BASEDIR/openqrm
DEPLOYMENT = "nfs-deployment"
# The initrd's own modules (openQRM: every NIC driver and virtio*, flat): the NICs QEMU gives a node.
INITRD_MODULES = ("virtio_net", "virtio_pci", "e1000")
# modules-NAME.tgz: what linuxrc and root-mount modprobe, and the node's NFS client (nfsv3: root-mount's
# `mount -t nfs` without vers= is NFSv3).
MODULES = (*INITRD_MODULES, "netfs", "fscache", "sunrpc", "grace", "lockd", "nfs", "nfsv3", "nfsv4")
# The storage server's ports a node's NFSv3 root mount uses: rpcbind, NFS, and mountd (the lab's ganesha
# listens for MOUNT on a fixed port, NFS_CORE_PARAM MNT_Port).
RPCBIND_PORT, NFS_PORT, MOUNTD_PORT = 111, 2049, 20048
HTTP_PORT = 80


def openqrm_src() -> Path:
    """openQRM 5.3.60's source: $QRMFS_OPENQRM_SRC, else <repo>/../shared/openqrm-5.3.60."""
    d = Path(os.environ.get(OPENQRM_SRC_ENV) or REPO.parent / "shared" / "openqrm-5.3.60")
    missing = [p for p in (LINUXRC, ROOT_MOUNT, DEVICES, *CLIENT_INCLUDES) if not (d / p).is_file()]
    if missing:
        raise LabError(f"openQRM's source is not at {d} (missing {', '.join(missing)}): the openQRM boot needs "
                       f"../shared/openqrm-5.3.60 beside the repository, or {OPENQRM_SRC_ENV}")
    return d


# --- the node's network: QEMU user networking laid over the lab's docker subnet -----------------------------

@dataclass(frozen=True)
class GuestNet:
    """The node's view of the lab network. QEMU's user network takes the lab's docker subnet, so the node
    reaches the openQRM server and the storage server at their real addresses (the ones openQRM's records
    hold) through guestfwd relays, and nothing else (restrict=on)."""

    subnet: str
    gateway: str   # QEMU's own address in the guest network (the default route)
    dns: str       # QEMU's DNS address (unused: the node resolves nothing), kept off the containers' addresses
    ip: str        # the node
    netmask: str


def guest_net(subnet: str) -> GuestNet:
    """Addresses at the top of the lab's subnet, where docker's allocator (from the bottom) does not reach."""
    net = ipaddress.ip_network(subnet, strict=False)
    if net.version != 4 or net.num_addresses < 16:
        raise LabError(f"the lab network {subnet} is not an IPv4 subnet of 16 addresses or more")
    top = net.broadcast_address
    return GuestNet(str(net), str(net.network_address + 1), str(top - 3), str(top - 2), str(net.netmask))


def netdev(net: GuestNet, openqrm: str, storage: str) -> str:
    """QEMU's -netdev for an openQRM node: HTTP to the openQRM server, rpcbind/mountd/NFS to the storage."""
    fwds = [(openqrm, HTTP_PORT), (storage, RPCBIND_PORT), (storage, MOUNTD_PORT), (storage, NFS_PORT)]
    for addr, _ in fwds:
        if ipaddress.ip_address(addr) not in ipaddress.ip_network(net.subnet):
            raise LabError(f"{addr} is not in the lab network {net.subnet}")
    if len({net.ip, net.gateway, net.dns} & {openqrm, storage}):
        raise LabError(f"the node's addresses {net} collide with the lab's containers")
    guestfwd = ",".join(f"guestfwd=tcp:{a}:{p}-cmd:{relay_command(a, p)}" for a, p in fwds)
    return f"user,id=net0,restrict=on,net={net.subnet},host={net.gateway},dns={net.dns},{guestfwd}"


def kernel_cmdline(server: str, net: GuestNet, mac: str) -> str:
    """openqrm-pxelinux's `append` for a new resource (id=-1), plus what its `ipappend 3` adds, plus the
    serial console."""
    bootif = "01-" + mac.lower().replace(":", "-")
    return (f"console=ttyS0,115200 panic=-1 ramdisk_size=131072 apm=off id=-1 openqrm={server} selinux=0 "
            f"net.ifnames=0 ip={net.ip}:{server}:{net.gateway}:{net.netmask} BOOTIF={bootif}")


# --- the kit: initrd and the boot-service files ------------------------------------------------------------

@dataclass(frozen=True)
class Kit:
    initrd: Path        # openQRM-style initramfs (gzip'd newc cpio), /init = openqrm-linuxrc
    boot_files: Path    # boot/vmlinuz-NAME, boot/System.map-NAME, boot/modules-NAME.tgz, root-mount.*
    kernel_version: str


def kit_hash(src: Path) -> str:
    h = hashlib.sha256(KIT_FORMAT.encode() + b"\0")
    for p in (LINUXRC, ROOT_MOUNT, DEVICES):
        h.update(p.encode() + b"\0" + (src / p).read_bytes() + b"\0")
    for f in (BUSYBOX, BASH_STATIC):
        h.update(hashlib.sha256(f.read_bytes()).digest() if f.exists() else b"none")
    h.update(" ".join(MODULES).encode())
    return h.hexdigest()[:12]


def busybox_applets(listing: str) -> list[str]:
    """`busybox --list-full` -> applet paths to link (never bash, which is bash-static here): each where
    Debian's busybox puts it, and in /bin as well, where openQRM's initrd has its tools (linuxrc runs
    /bin/wget, /bin/ash, /bin/cp)."""
    out: list[str] = []
    for line in listing.split():
        rel = line.strip().lstrip("/")
        name = rel.rsplit("/", 1)[-1]
        if not rel or name in ("busybox", "bash") or ".." in rel.split("/"):
            continue
        for path in (rel, f"bin/{name}"):
            if path not in out:
                out.append(path)
    return out


def _module_bytes(mods: Path, rel: str) -> tuple[str, bytes]:
    data = (mods / rel).read_bytes()
    if rel.endswith(".ko.xz"):
        return rel[:-3], lzma.decompress(data)
    if rel.endswith(".ko"):
        return rel, data
    raise LabError(f"cannot use a module compressed like {rel} with busybox modprobe")


def _cpio(stage: Path, dest: Path) -> None:
    files = sorted(str(p.relative_to(stage)) for p in stage.rglob("*"))
    r = subprocess.run(["cpio", "-o", "-H", "newc", "--quiet", "-R", "0:0"], cwd=stage,
                       input="\n".join(files).encode() + b"\n", capture_output=True)
    if r.returncode != 0:
        raise LabError(f"cpio failed: {r.stderr.decode(errors='replace')[-500:]}")
    with gzip.open(dest, "wb", compresslevel=6) as g:
        g.write(r.stdout)


def build_kit(prep: Prepared, src: Path, dest: Path) -> None:
    """Assemble the initrd and the boot-service files into `dest` (a new directory)."""
    for f, pkg in ((BUSYBOX, "busybox-static"), (BASH_STATIC, "bash-static")):
        if not f.is_file():
            raise LabError(f"{f} is missing: install {pkg} (scripts/setup.sh does)")
    kver = prep.kernel_version
    kdir = prep.vmlinuz.parent
    with tempfile.TemporaryDirectory(dir=boot_dir(), prefix=".openqrm-kit-") as tmp:
        t = Path(tmp)
        root = t / "kernel"
        _run(["dpkg-deb", "-x", str(kdir / "kernel.deb"), str(root)], "dpkg-deb -x")
        mods = _modules_root(root, kver)
        _run(["depmod", "-b", str(mods.parents[2]), kver], "depmod -b")
        out = t / "out"
        (out / "boot").mkdir(parents=True)
        _initrd(t / "initrd", src, mods, kver, out / "initrd.cpio.gz")
        # The kernel record's files, named as openQRM names them.
        shutil.copyfile(kdir / "vmlinuz", out / "boot" / f"vmlinuz-{KERNEL_NAME}")
        shutil.copyfile(root / "boot" / f"System.map-{kver}", out / "boot" / f"System.map-{KERNEL_NAME}")
        _modules_tgz(mods, kver, out / "boot" / f"modules-{KERNEL_NAME}.tgz")
        shutil.copyfile(src / ROOT_MOUNT, out / f"root-mount.{DEPLOYMENT}")
        (out / f"root-mount.{DEPLOYMENT}").chmod(0o755)
        if dest.exists():
            shutil.rmtree(dest)
        out.rename(dest)


def _load_order(mods: Path, wanted: tuple[str, ...]) -> list[str]:
    builtin = (mods / "modules.builtin").read_text() if (mods / "modules.builtin").exists() else ""
    return module_load_order((mods / "modules.dep").read_text(), list(wanted), builtin)


def _initrd(s: Path, src: Path, mods: Path, kver: str, dest: Path) -> None:
    """The initrd, laid out as openqrm_server_create_kernel lays it out: the template (here the stand-in), the
    NIC modules flat in lib/modules/VERSION, openqrm-linuxrc as /init."""
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "dev", "etc", "proc", "sys", "tmp", "mnt", "boot",
              "var/log", "run/udev", f"lib/modules/{kver}"):
        (s / d).mkdir(parents=True, exist_ok=True)
    shutil.copy2(BUSYBOX, s / "bin" / "busybox")
    for rel in busybox_applets(_run([str(BUSYBOX), "--list-full"], "busybox --list-full")):
        link = s / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.exists() and not link.is_symlink():
            link.symlink_to("/bin/busybox")
    shutil.copy2(BASH_STATIC, s / "bin" / "bash")
    shutil.copyfile(src / LINUXRC, s / "init")
    (s / "init").chmod(0o755)
    shutil.copyfile(src / DEVICES, s / "etc" / "initrd-devices.conf")
    for rel in _load_order(mods, INITRD_MODULES):
        name, data = _module_bytes(mods, rel)
        (s / "lib" / "modules" / kver / name.rsplit("/", 1)[-1]).write_bytes(data)
    _cpio(s, dest)


def _modules_tgz(mods: Path, kver: str, dest: Path) -> None:
    """modules-NAME.tgz: lib/modules/VERSION/... (MODULES and their dependencies, uncompressed)."""
    base = f"lib/modules/{kver}"
    with tarfile.open(dest, "w:gz", compresslevel=6) as tar:
        for rel in _load_order(mods, MODULES):
            name, data = _module_bytes(mods, rel)
            _add_file(tar, f"{base}/{name}", data, 0o644)
        for meta in ("modules.builtin", "modules.builtin.modinfo", "modules.order"):
            if (mods / meta).is_file():
                _add_file(tar, f"{base}/{meta}", (mods / meta).read_bytes(), 0o644)


def _add_file(tar: tarfile.TarFile, name: str, data: bytes, mode: int) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.uid, info.gid, info.mtime = len(data), mode, 0, 0, 0
    tar.addfile(info, io.BytesIO(data))


def _add_dirs(tar: tarfile.TarFile, path: str, seen: set[str]) -> None:
    parts = path.split("/")[:-1]
    for i in range(1, len(parts) + 1):
        d = "/".join(parts[:i])
        if d not in seen:
            seen.add(d)
            info = tarfile.TarInfo(d)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
            tar.addfile(info)


def client_bundle(src: Path, script: str | None) -> bytes:
    """openqrm-client.tgz as openqrm_server_create_client lays it out (paths BASEDIR/openqrm/..., BASEDIR
    without its leading /): openQRM's include files, the lab's stand-in init script and unit, and the lab's
    probe with this boot's test script."""
    base = RESOURCE_BASEDIR.strip("/") + "/openqrm"
    files: list[tuple[str, bytes, int]] = [
        *((f"{base}/include/{Path(p).name}", (src / p).read_bytes(), 0o755) for p in CLIENT_INCLUDES),
        (f"{base}/etc/init.d/openqrm-client", (STANDINS / "openqrm-client").read_bytes(), 0o755),
        (f"{base}/etc/systemd/system/openqrm-client.service",
         (STANDINS / "openqrm-client.service").read_bytes(), 0o644),
        (f"{base}/lab/probe.sh", (BOOTKIT / "probe.sh").read_bytes(), 0o755),
        (f"{base}/lab/probe-sysv.sh", (BOOTKIT / "probe-sysv.sh").read_bytes(), 0o755),
    ]
    if script is not None:
        files.append((f"{base}/lab/test.sh", script.encode(), 0o755))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        seen: set[str] = set()
        for name, data, mode in files:
            _add_dirs(tar, name, seen)
            _add_file(tar, name, data, mode)
    return buf.getvalue()


def prepare_kit(prep: Prepared) -> Kit:
    """The kit for `prep`'s kernel, built once and cached under state_dir()/boot/ (a lock serialises builders)."""
    src = openqrm_src()
    with _locked(boot_dir() / ".lock"):
        dest = boot_dir() / f"openqrm-{prep.kernel_version}-{kit_hash(src)}"
        if not (dest / "initrd.cpio.gz").is_file():
            build_kit(prep, src, dest)
    return Kit(dest / "initrd.cpio.gz", dest, prep.kernel_version)


# --- one boot ---------------------------------------------------------------------------------------------

def lab_subnet(info: dict[str, Any]) -> str:
    """The lab's docker network's IPv4 subnet."""
    import docker

    net = docker.from_env().networks.get(info["network"])
    for cfg in (net.attrs.get("IPAM") or {}).get("Config") or []:
        sub = cfg.get("Subnet", "")
        if sub and ":" not in sub:
            return str(sub)
    raise LabError(f"the lab network {info['network']} has no IPv4 subnet")


# --- the server's side: what openQRM's install and an administrator do ------------------------------------

SERVER_BASE = "/usr/share/openqrm"            # OPENQRM_SERVER_BASE_DIR/openqrm (lab/images/openqrm/install.sh)
BOOT_SERVICE = f"{SERVER_BASE}/web/boot-service"   # served as /openqrm/boot-service/
TFTPBOOT = f"{SERVER_BASE}/tftpboot/boot"     # where openqrm_server_create_kernel puts a kernel's files


def _tar(files: list[tuple[str, bytes, int]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data, mode in files:
            _add_file(tar, name, data, mode)
    return buf.getvalue()


def _exec(container: Any, argv: list[str]) -> str:
    code, out = container.exec_run(argv)
    text = (out or b"").decode(errors="replace")
    if code != 0:
        raise LabError(f"openQRM server: {' '.join(argv)} failed (exit {code}): {text.strip()[-300:]}")
    return text


def install_kernel(container: Any, kit: Kit) -> int:
    """What `openqrm kernel add` leaves on the server (openqrm_server_create_kernel: vmlinuz-NAME,
    System.map-NAME and modules-NAME.tgz in tftpboot/boot, which linuxrc fetches as /openqrm/boot-service/boot/)
    and its kernel record (kernel.class.php add: id, name, version). Returns the kernel id."""
    from .. import openqrm as oq

    files = [(p.name, p.read_bytes(), 0o444) for p in sorted((kit.boot_files / "boot").iterdir())]
    _exec(container, ["mkdir", "-p", TFTPBOOT])
    if not container.put_archive(TFTPBOOT, _tar(files)):
        raise LabError(f"openQRM server: cannot write the kernel files into {TFTPBOOT}")
    _exec(container, ["ln", "-sfn", "../../tftpboot/boot", f"{BOOT_SERVICE}/boot"])
    rows = oq.sql(container, f"SELECT kernel_id FROM kernel_info WHERE kernel_name={oq.quote(KERNEL_NAME)}")
    if rows:
        kid = int(str(rows[0]["kernel_id"]))
        oq.sql(container, f"UPDATE kernel_info SET kernel_version={oq.quote(kit.kernel_version)} WHERE kernel_id={kid}")
        return kid
    kid = oq.new_id()
    oq.sql(container, "INSERT INTO kernel_info (kernel_id, kernel_name, kernel_version, kernel_capabilities, "
                      f"kernel_comment) VALUES ({kid}, {oq.quote(KERNEL_NAME)}, {oq.quote(kit.kernel_version)}, '', "
                      f"{oq.quote('qrmfs lab kernel')})")
    return kid


def install_client(container: Any, bundle: bytes) -> None:
    """openqrm-client.tgz where openqrm_server_create_client puts it (the boot-service directory)."""
    if not container.put_archive(BOOT_SERVICE, _tar([("openqrm-client.tgz", bundle, 0o644)])):
        raise LabError(f"openQRM server: cannot write openqrm-client.tgz into {BOOT_SERVICE}")


def resource_url(server: str, mac: str, ip: str, netmask: str) -> str:
    """The node's first contact (linuxrc's get_parameter with id=-1: an unknown MAC becomes a resource), with
    the resource_basedir its idle openqrm-client would report afterwards (resource-monitor.php stores every
    resource_* parameter it gets)."""
    from urllib.parse import urlencode

    q = urlencode({"resource_command": "get_parameter", "resource_id": "-1", "resource_mac": mac.upper(),
                   "resource_ip": ip, "resource_subnet": netmask, "resource_basedir": RESOURCE_BASEDIR})
    return f"http://{server}:{HTTP_PORT}/openqrm/action/resource-monitor.php?{q}"


def parse_parameters(text: str) -> dict[str, str]:
    """get_parameter's answer (`key="value"` lines, as linuxrc sources it) as a dict."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and key.isidentifier():
            out[key] = value[1:-1] if len(value) >= 2 and value[0] == value[-1] == '"' else value
    return out


def register_node(server: str, mac: str, net: GuestNet) -> dict[str, str]:
    """The node as openQRM knows it after its first (idle) boot: its resource record. Returns its parameters."""
    import urllib.request

    with urllib.request.urlopen(resource_url(server, mac, net.ip, net.netmask), timeout=30) as r:
        params = parse_parameters(r.read().decode(errors="replace"))
    if not params.get("resource_id") or params.get("resource_mac", "").upper() != mac.upper():
        raise LabError(f"openQRM did not register the node {mac} (get_parameter gave {params})")
    return params


def assign(container: Any, resource_id: int, image_name: str, kernel_id: int) -> dict[str, int]:
    """What an administrator does in the UI to boot the node from the image: an appliance of node, image and
    kernel (appliance.class.php add), started (start(), storage authentication aside: the image active, the
    resource in transition and assigned kernel and image, the appliance active with stoptime 0)."""
    from .. import openqrm as oq

    images = oq.sql(container, f"SELECT image_id, image_name, image_type FROM image_info "
                               f"WHERE image_name={oq.quote(image_name)}")
    if len(images) != 1:
        raise LabError(f"openQRM has {len(images)} image records named {image_name!r}, not one (is it registered?)")
    image_id = int(str(images[0]["image_id"]))
    now = int(time.time())
    name = f"lab-node-{resource_id}"[-50:]
    have = oq.sql(container, f"SELECT appliance_id FROM appliance_info WHERE appliance_resources={resource_id}")
    if have:
        app_id = int(str(have[0]["appliance_id"]))
        oq.sql(container, f"UPDATE appliance_info SET appliance_kernelid={kernel_id}, appliance_imageid={image_id} "
                          f"WHERE appliance_id={app_id}")
    else:
        app_id = oq.new_id()
        oq.sql(container, "INSERT INTO appliance_info (appliance_id, appliance_name, appliance_kernelid, "
                          "appliance_imageid, appliance_resources, appliance_virtualization, appliance_stoptime, "
                          f"appliance_state, appliance_comment) VALUES ({app_id}, {oq.quote(name)}, {kernel_id}, "
                          f"{image_id}, {resource_id}, '1', {now}, 'stopped', {oq.quote('qrmfs lab node')})")
    oq.sql(container, f"UPDATE image_info SET image_isactive=1 WHERE image_id={image_id}")
    oq.sql(container, "UPDATE resource_info SET resource_state='transition', resource_event='reboot', "
                      f"resource_kernelid={kernel_id}, resource_kernel={oq.quote(KERNEL_NAME)}, "
                      f"resource_imageid={image_id}, resource_image={oq.quote(image_name)} "
                      f"WHERE resource_id={resource_id}")
    oq.sql(container, f"UPDATE appliance_info SET appliance_stoptime=0, appliance_starttime={now}, "
                      f"appliance_state='active' WHERE appliance_id={app_id}")
    return {"appliance_id": app_id, "image_id": image_id, "kernel_id": kernel_id, "resource_id": resource_id}


@dataclass(frozen=True)
class Node:
    """One node made ready to boot the openQRM way: its initrd, command line and network, and its records."""

    initrd: bytes          # the kit's initrd (the per-boot cpio is appended to it)
    cmdline: str
    netdev: str
    records: dict[str, int]  # appliance_id, image_id, kernel_id, resource_id


def ready_node(info: dict[str, Any], prep: Prepared, *, image_name: str, mac: str, script: str | None) -> Node:
    """Everything before QEMU starts: the kit, the kernel and the client bundle on the lab's real openQRM
    server, the node's resource, and the appliance that assigns it the image and the kernel."""
    import docker

    kit = prepare_kit(prep)
    hosts = info["hosts"]
    server, storage = hosts["openqrm"]["address"], hosts["storage"]["address"]
    container = docker.from_env().containers.get(hosts["openqrm"]["container_id"])
    net = guest_net(lab_subnet(info))
    kernel_id = install_kernel(container, kit)
    install_client(container, client_bundle(openqrm_src(), script))
    params = register_node(server, mac, net)
    records = assign(container, int(params["resource_id"]), image_name, kernel_id)
    return Node(kit.initrd.read_bytes(), kernel_cmdline(server, net, mac), netdev(net, server, storage), records)
