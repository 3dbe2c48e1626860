"""The container lab: an NFS storage server, an sshd source host, the real openQRM 5.3.60 server and an
openQRM mock (for injected faults only) on one network.

Started with testcontainers (Ryuk disabled: it is an image that cannot be pulled here); found again by
docker labels, so `python -m lab up` is idempotent and `down` removes exactly what `up` made.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker
import docker.errors
import httpx

os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")

from testcontainers.core.container import DockerContainer
from testcontainers.core.network import Network
from testcontainers.core.waiting_utils import WaitStrategy

from . import exports, keys
from . import images as _images
from . import openqrm as _oq
from .images import ROLES, LabError
from .paths import state_dir

LABEL = "io.qrmfs.lab"
ROLE_LABEL = "io.qrmfs.lab.role"
STATE_LABEL = "io.qrmfs.lab.state"  # the state dir (keys) the containers were started with
EXPORT_LABEL = "io.qrmfs.lab.export"  # the kind of /exports the storage was started with: xfs or plain
# $QRMFS_LAB_NAME lets a second checkout (or a helper, or make bench) run its own lab beside the default one.
DEFAULT_NAME = os.environ.get("QRMFS_LAB_NAME") or "qrmfs-lab"
# Not openQRM's default openqrm/openqrm: a password unlike every other string lets tests prove it never leaks.
OPENQRM_USER, OPENQRM_PASSWORD = "openqrm", "lab-Secret-4711"
# A user who is not an administrator (openQRM's `readonly` role): the real server answers it 200 and does nothing.
VIEWER_USER, VIEWER_PASSWORD = "viewer", "lab-Viewer-0815"
OPENQRM, MOCK = "openqrm", "openqrm-mock"
EXPORT_ROOT = exports.EXPORT_ROOT
PLAIN_ROOT = exports.PLAIN_ROOT
READY_TIMEOUT = 90
# On demand (`up --sources ...`): more source hosts. Each debootstrap source (lab/images/sources/NAME) runs
# its own image; `mounts` runs the default source's image with separate filesystems below its root.
MOUNTS = "mounts"


def extra_sources() -> list[str]:
    return [*_images.source_names(), MOUNTS]


# On demand (`up --storages N`): more storage servers, `storage2` ... `storageN`, each the storage image with its
# own /exports and /exports-plain on docker volumes, and its own `[storage.storageN]` block (storage_id N).
MAX_STORAGES = 4


def extra_storages(count: int) -> list[str]:
    if not 1 <= count <= MAX_STORAGES:
        raise LabError(f"--storages must be 1 to {MAX_STORAGES}, not {count}")
    return [f"storage{i}" for i in range(2, count + 1)]


def is_extra_storage(role: str) -> bool:
    return role in extra_storages(MAX_STORAGES)

# Inside each container: what must hold before the host-side probes start.
_INNER_READY = {
    "storage": "test -e /run/sshd.pid && pgrep -x ganesha.nfsd >/dev/null",
    "source": "test -e /srv/fixture/.complete && test -e /run/sshd.pid",
    # entrypoint.sh marks the end of its set-up (schema, users, deployment type); the DB must still answer.
    OPENQRM: "test -e /run/openqrm.ready && lab-openqrm-db status",
    MOCK: "python3 -c \"import urllib.request as u; u.urlopen('http://127.0.0.1/_mock/health')\"",
}


def _inner_ready(role: str) -> str:
    if role in _INNER_READY:
        return _INNER_READY[role]
    if role == MOUNTS:
        return _INNER_READY["source"]
    if is_extra_storage(role):
        return _INNER_READY["storage"]
    return "test -e /run/sshd.pid"


class InnerReady(WaitStrategy):
    """Ready when a check inside the container passes; fails at once when the container has exited."""

    def __init__(self, script: str) -> None:
        super().__init__()
        self.script = script

    def wait_until_ready(self, container: Any) -> None:
        wrapped = container.get_wrapped_container()
        deadline = time.monotonic() + self._startup_timeout
        while True:
            wrapped.reload()
            if wrapped.status not in ("created", "running"):
                raise LabError(f"container {wrapped.name} exited ({wrapped.status})")
            code, out = wrapped.exec_run(["bash", "-c", self.script])
            if code == 0:
                return
            if time.monotonic() > deadline:
                raise LabError(f"container {wrapped.name}: `{self.script}` still fails after "
                               f"{self._startup_timeout:.0f}s: {out.decode(errors='replace')[-300:]}")
            time.sleep(self._poll_interval)


@dataclass(frozen=True)
class LabHandle:
    name: str

    @property
    def state(self) -> Path:
        d = state_dir() / self.name
        d.mkdir(parents=True, exist_ok=True)
        d.chmod(0o700)
        return d

    @property
    def network(self) -> str:
        return f"{self.name}-net"

    @property
    def volume(self) -> str:
        return f"{self.name}-exports"

    @property
    def plain_volume(self) -> str:
        return f"{self.name}-exports-plain"

    def container_name(self, role: str) -> str:
        return f"{self.name}-{role}"


def _client() -> docker.DockerClient:
    try:
        c = docker.from_env()
        c.ping()
        return c
    except docker.errors.DockerException as e:
        raise LabError(f"no docker engine answers ({e}); run `make setup` to start dockerd") from e


def _labels(lab: LabHandle, role: str | None = None) -> dict[str, str]:
    d = {LABEL: lab.name}
    if role:
        d[ROLE_LABEL] = role
        d[STATE_LABEL] = str(lab.state)
    return d


def _containers(client: docker.DockerClient, lab: LabHandle) -> dict[str, Any]:
    found = client.containers.list(all=True, filters={"label": f"{LABEL}={lab.name}"})
    return {c.labels.get(ROLE_LABEL): c for c in found}


def _address(container: Any, lab: LabHandle) -> str:
    container.reload()
    nets = container.attrs["NetworkSettings"]["Networks"]
    if lab.network not in nets or not nets[lab.network]["IPAddress"]:
        raise LabError(f"container {container.name} has no address on {lab.network}")
    return str(nets[lab.network]["IPAddress"])


def _start(lab: LabHandle, client: docker.DockerClient, tags: dict[str, str], export: str) -> None:
    down(lab.name, quiet=True)
    keys.ensure_keys(lab.state, ("storage", "source"))
    _password_files(lab)
    net = Network(docker_network_kw={"labels": _labels(lab)})
    net.name = lab.network
    net.create()
    client.volumes.create(name=lab.plain_volume, labels=_labels(lab))
    if export == "xfs":
        exports_src = str(exports.prepare(lab.state))  # loop-mounted XFS, bind-mounted into the container
    else:
        exports_src = client.volumes.create(name=lab.volume, labels=_labels(lab)).name
    for role in ROLES:
        kwargs: dict[str, Any] = {"labels": _labels(lab, role), "hostname": f"lab-{role}"}
        volumes: dict[str, dict[str, str]] = {}
        if role in ("storage", "source", OPENQRM):
            volumes[str(lab.state / "hosts" / role)] = {"bind": "/lab", "mode": "ro"}
        if role == "storage":
            volumes[exports_src] = {"bind": EXPORT_ROOT, "mode": "rw"}
            volumes[lab.plain_volume] = {"bind": PLAIN_ROOT, "mode": "rw"}
            kwargs["labels"][EXPORT_LABEL] = export
            # ganesha's VFS FSAL uses open_by_handle_at; privileged mode is refused here: grant just these.
            kwargs["cap_add"] = ["DAC_READ_SEARCH", "SYS_ADMIN"]
        c = (DockerContainer(tags[role])
             .with_name(lab.container_name(role))
             .with_network(net)
             .with_network_aliases(role)
             .with_kwargs(**kwargs)
             .waiting_for(InnerReady(_INNER_READY[role])
                          .with_startup_timeout(READY_TIMEOUT).with_poll_interval(0.2)))
        if role == MOCK:
            c.with_env("MOCK_USERS", f"{OPENQRM_USER}:{OPENQRM_PASSWORD}:administrator,"
                                     f"{VIEWER_USER}:{VIEWER_PASSWORD}:readonly")
        for src, spec in volumes.items():
            c.with_volume_mapping(src, spec["bind"], spec["mode"])
        try:
            c.start()
        except Exception as e:
            raise LabError(f"the lab's {role} container did not become ready: {e}\n{_logs(client, lab, role)}"
                           ) from e


# The `mounts` host's separate filesystems: real ext4 filesystems (loop devices mounted on this machine,
# then bound into the container), so the container's mount table shows them as real hosts do, plus a bind
# mount of a directory (which qrmfs must skip with a warning).
MOUNTS_FS = {
    "boot": ("/boot", {"config-6.1.0-lab-amd64": "# a separate /boot\n", "grub/grub.cfg": "# lab\n"}),
    "varlog": ("/var/log", {"separate-fs.log": "written on the separate /var/log\n",
                            "lab-mounts/app.log": "an application's log directory\n"}),
}
MOUNTS_BIND = ("data", "/srv/data")


def _mounts_dir(lab: LabHandle) -> Path:
    return lab.state / "mounts"


def _is_mountpoint(path: Path) -> bool:
    return subprocess.run(["mountpoint", "-q", str(path)], stdin=subprocess.DEVNULL).returncode == 0


def _mounts_volumes(lab: LabHandle) -> dict[str, dict[str, str]]:
    """Make (once) and mount the separate filesystems of the `mounts` host; the container's volume spec."""
    base = _mounts_dir(lab)
    vols: dict[str, dict[str, str]] = {}
    for key, (target, files) in MOUNTS_FS.items():
        img, mnt, content = base / f"{key}.ext4", base / key, base / f"{key}.content"
        mnt.mkdir(parents=True, exist_ok=True)
        if not _is_mountpoint(mnt):
            if not img.exists():
                for rel, text in files.items():
                    (content / rel).parent.mkdir(parents=True, exist_ok=True)
                    (content / rel).write_text(text)
                r = subprocess.run(["mkfs.ext4", "-q", "-F", "-L", f"lab-{key}", "-d", str(content), str(img), "32M"],
                                   capture_output=True, text=True, stdin=subprocess.DEVNULL)
                if r.returncode != 0:
                    raise LabError(f"mkfs.ext4 for the mounts host's {target} failed: {r.stderr.strip()}")
            r = subprocess.run(["mount", "-o", "loop", str(img), str(mnt)], capture_output=True, text=True,
                               stdin=subprocess.DEVNULL)
            if r.returncode != 0:
                raise LabError(f"cannot loop-mount {img} for the mounts host's {target}: {r.stderr.strip()}")
        vols[str(mnt)] = {"bind": target, "mode": "rw"}
    data = base / MOUNTS_BIND[0]
    data.mkdir(parents=True, exist_ok=True)
    (data / "bound.txt").write_text("a bind mount of a directory: not copied\n")
    vols[str(data)] = {"bind": MOUNTS_BIND[1], "mode": "rw"}
    return vols


def _unmount_mounts(lab: LabHandle) -> list[str]:
    done = []
    for key in MOUNTS_FS:
        mnt = _mounts_dir(lab) / key
        if mnt.is_dir() and _is_mountpoint(mnt):
            subprocess.run(["umount", str(mnt)], capture_output=True, stdin=subprocess.DEVNULL)
            done.append(f"mount {mnt}")
    return done


def _start_sources(lab: LabHandle, client: docker.DockerClient, names: list[str], tags: dict[str, str]) -> None:
    """Start (or replace) the extra source hosts `names` on the running lab's network."""
    keys.ensure_keys(lab.state, tuple(names))
    for role in names:
        volumes = [(str(lab.state / "hosts" / role), "/lab", "ro")]
        if role == MOUNTS:
            volumes += [(src, spec["bind"], spec["mode"]) for src, spec in _mounts_volumes(lab).items()]
        _start_extra(lab, client, role, tags[role], _labels(lab, role), volumes, {}, "host")


def _start_storages(lab: LabHandle, client: docker.DockerClient, names: list[str], tag: str) -> None:
    """Start (or replace) the extra storage servers `names` on the running lab's network: each gets its own
    docker volumes for /exports and /exports-plain (a plain export, no XFS)."""
    keys.ensure_keys(lab.state, tuple(names))
    for role in names:
        volumes = [(str(lab.state / "hosts" / role), "/lab", "ro")]
        for root in (EXPORT_ROOT, PLAIN_ROOT):
            vol = client.volumes.create(name=f"{lab.name}-{role}{root.replace('/', '-')}", labels=_labels(lab))
            volumes.append((vol.name, root, "rw"))
        _start_extra(lab, client, role, tag, {**_labels(lab, role), EXPORT_LABEL: "plain"}, volumes,
                     {"cap_add": ["DAC_READ_SEARCH", "SYS_ADMIN"]}, "server")


def _start_extra(lab: LabHandle, client: docker.DockerClient, role: str, tag: str,  # noqa: PLR0913 - one container
                 labels: dict[str, str], volumes: list[tuple[str, str, str]], kwargs: dict[str, Any],
                 noun: str) -> None:
    """One extra container (a source host or a storage server) on the lab's network, replacing any of that
    role, started and waited for until ready."""
    try:
        client.containers.get(lab.container_name(role)).remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    net = Network()
    net.name = lab.network
    c = (DockerContainer(tag)
         .with_name(lab.container_name(role))
         .with_network(net)
         .with_network_aliases(role)
         .with_kwargs(labels=labels, hostname=f"lab-{role}", **kwargs)
         .waiting_for(InnerReady(_inner_ready(role))
                      .with_startup_timeout(READY_TIMEOUT).with_poll_interval(0.2)))
    for src, bind, mode in volumes:
        c.with_volume_mapping(src, bind, mode)
    try:
        c.start()
    except Exception as e:
        raise LabError(f"the lab's {role} {noun} did not become ready: {e}\n{_logs(client, lab, role)}") from e


def _logs(client: docker.DockerClient, lab: LabHandle, role: str) -> str:
    try:
        out = client.containers.get(lab.container_name(role)).logs(tail=20).decode(errors="replace")
        return f"--- last lines of {lab.container_name(role)} ---\n{out}"
    except docker.errors.NotFound:
        return ""


def _wait(what: str, probe: Any, timeout: float = READY_TIMEOUT) -> None:
    """Poll a real probe until it succeeds or the deadline passes (no fixed sleeps)."""
    deadline = time.monotonic() + timeout
    last = ""
    while True:
        try:
            ok, last = probe()
            if ok:
                return
        except Exception as e:  # a probe that raises is a probe that failed this round
            last = str(e)
        if time.monotonic() > deadline:
            raise LabError(f"lab: {what} not ready after {timeout:.0f}s: {last.strip()[-500:]}")
        time.sleep(0.2)


def ssh_argv(info: dict[str, Any], role: str) -> list[str]:
    """ssh argv to a lab host as root, verified against the lab's known_hosts."""
    host = info["hosts"][role]
    return ["ssh", "-i", info["ssh"]["private_key"], "-o", f"UserKnownHostsFile={info['ssh']['known_hosts']}",
            "-o", "StrictHostKeyChecking=yes", "-o", "BatchMode=yes", "-o", "ConnectTimeout=5",
            "-p", str(host["ssh_port"]), f"root@{host['address']}"]


def _probe_all(info: dict[str, Any]) -> None:
    def ssh_probe(role: str) -> Any:
        def p() -> tuple[bool, str]:
            r = subprocess.run([*ssh_argv(info, role), "true"], capture_output=True, text=True, timeout=15)
            return r.returncode == 0, r.stderr
        return p

    def nfs_probe() -> tuple[bool, str]:
        for role in ("storage", *info.get("storages", [])):
            for root in (EXPORT_ROOT, PLAIN_ROOT):
                url = f"nfs://{info['hosts'][role]['address']}{root}?version=4"
                r = subprocess.run(["nfs-ls", url], capture_output=True, text=True, timeout=15)
                if r.returncode != 0:
                    return False, f"{role}:{root}: {r.stderr}"
        return True, ""

    def http_probe() -> tuple[bool, str]:
        r = httpx.get(info["openqrm_mock"]["base"] + "/_mock/health", timeout=5)
        return r.status_code == 200, r.text

    def openqrm_probe() -> tuple[bool, str]:
        # apache's Basic-auth layer (openQRM's .htaccess) answers for the authenticated endpoint
        r = httpx.get(info["openqrm"]["url"] + "/base/server/image/image-action.php", timeout=5)
        return r.status_code == 401 and "openQRM" in r.headers.get("www-authenticate", ""), f"{r.status_code}"

    _wait("ssh to storage", ssh_probe("storage"))
    _wait("ssh to source", ssh_probe("source"))
    for role in sorted(set(info["hosts"]) - set(ROLES)):
        _wait(f"ssh to {role}", ssh_probe(role))
    _wait("NFS on storage", nfs_probe)
    _wait("openQRM mock", http_probe)
    _wait("openQRM server", openqrm_probe)


def _info(lab: LabHandle, found: dict[str, Any]) -> dict[str, Any]:
    extra = sorted(r for r in found if r in extra_sources() or is_extra_storage(r))
    addr = {role: _address(found[role], lab) for role in (*ROLES, *extra)}
    state = lab.state
    known_hosts = keys.write_known_hosts(state, {r: addr[r] for r in ("storage", "source", *extra)})
    pw, viewer_pw = _password_files(lab)
    base = f"http://{addr[OPENQRM]}:80"
    mock_base = f"http://{addr[MOCK]}:80"
    server = found[OPENQRM]
    facts = _openqrm_facts(lab, server)
    kind = found["storage"].labels.get(EXPORT_LABEL, "plain")
    info: dict[str, Any] = {
        "name": lab.name,
        "network": lab.network,
        "hosts": {
            "storage": {"address": addr["storage"], "ssh_port": 22, "nfs_port": 2049,
                        "export_root": EXPORT_ROOT, "container_id": found["storage"].id,
                        # /exports: XFS with reflinks (kind xfs) or the docker volume; /exports-plain: a volume.
                        "export_kind": kind,
                        "exports": {EXPORT_ROOT: exports.FS_TYPE[kind], PLAIN_ROOT: exports.FS_TYPE["plain"]}},
            "source": {"address": addr["source"], "ssh_port": 22, "container_id": found["source"].id},
            OPENQRM: {"address": addr[OPENQRM], "ssh_port": None, "http_port": 80,
                      "container_id": server.id},
            MOCK: {"address": addr[MOCK], "ssh_port": None, "http_port": 80, "container_id": found[MOCK].id},
        },
        # The real openQRM 5.3.60 server (lab/images/openqrm): its administrator, a read-only user, the id its
        # nfs-storage plugin got for the nfs-deployment type, and its storage_id of each lab storage server.
        "openqrm": {"url": f"{base}/openqrm", "base": base, "user": OPENQRM_USER,
                    "password": OPENQRM_PASSWORD, "password_file": str(pw),
                    "viewer": {"user": VIEWER_USER, "password": VIEWER_PASSWORD, "password_file": str(viewer_pw)},
                    "version": "5.3.60", "nfs_deployment_id": facts["nfs_deployment_id"],
                    "storage_ids": facts["storage_ids"]},
        # The mock (lab/images/openqrm-mock): the same users; /_mock/fault makes it hang, fail or close.
        "openqrm_mock": {"url": f"{mock_base}/openqrm", "base": mock_base, "user": OPENQRM_USER,
                         "password": OPENQRM_PASSWORD, "password_file": str(pw)},
        "ssh": {"user": "root", "private_key": str(state / "id_ed25519"), "known_hosts": str(known_hosts)},
        "sources": {r: _source_facts(r) for r in extra if not is_extra_storage(r)},
        "storages": [r for r in extra if is_extra_storage(r)],
        "config": str(state / "qrmfs.toml"),
        "state_dir": str(state),
    }
    for r in extra:
        info["hosts"][r] = {"address": addr[r], "ssh_port": 22, "container_id": found[r].id}
        if is_extra_storage(r):
            plain = exports.FS_TYPE["plain"]
            info["hosts"][r].update(nfs_port=2049, export_root=EXPORT_ROOT, export_kind="plain",
                                    exports={EXPORT_ROOT: plain, PLAIN_ROOT: plain})
    (state / "qrmfs.toml").write_text(config_toml(info))
    (state / "lab.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


def config_toml(info: dict[str, Any], *, spool_dir: str | None = None, timeout: float | None = None,
                retries: int | None = None, backoff: float | None = None, server: str = "openqrm") -> str:
    """The qrmfs configuration for the lab (the one writer: `up` writes it to the state dir, the e2e tests
    write variants with their own spool and quicker openQRM retries). `server`: "openqrm" (the real
    server) or "openqrm_mock" (the mock, for tests that inject faults)."""
    s = info["hosts"]["storage"]
    sids = info["openqrm"]["storage_ids"]
    head = f"# qrmfs configuration for the lab `{info['name']}` (written by lab/lab.py).\n"
    if spool_dir is not None:
        head += f"spool_dir = {json.dumps(spool_dir)}\n"
    oq = [f"url = {json.dumps(info[server]['url'])}", f"user = {json.dumps(info[server]['user'])}",
          f"password_file = {json.dumps(info[server]['password_file'])}",
          f"deployment_id = {info['openqrm']['nfs_deployment_id']}"]  # the real server's: records need it
    oq += [f"{k} = {v}" for k, v in (("timeout", timeout), ("retries", retries), ("backoff", backoff))
           if v is not None]
    out = head + "\n[openqrm]\n" + "".join(f"{ln}\n" for ln in oq)
    out += f"""
[ssh]
identity_file = {json.dumps(info['ssh']['private_key'])}
known_hosts = {json.dumps(info['ssh']['known_hosts'])}

[storage.storage]
address = {json.dumps(s['address'])}
ssh_user = "root"
ssh_port = {s['ssh_port']}
export_root = {json.dumps(s['export_root'])}
storage_id = {sids['storage']}

# The same server's plain-directory export ({exports.FS_TYPE['plain']}, no reflinks): -t plain:{PLAIN_ROOT}/NAME
[storage.plain]
address = {json.dumps(s['address'])}
ssh_user = "root"
ssh_port = {s['ssh_port']}
export_root = "{PLAIN_ROOT}"
storage_id = {sids['storage']}
"""
    for role in info.get("storages", []):
        h = info["hosts"][role]
        out += f"""
# A second storage server (`python -m lab up --storages N`): its own /exports (plain) and storage_id.
[storage.{role}]
address = {json.dumps(h['address'])}
ssh_user = "root"
ssh_port = {h['ssh_port']}
export_root = {json.dumps(h['export_root'])}
storage_id = {sids[role]}
"""
    for role, h in sorted(info["hosts"].items()):
        if role in ("storage", OPENQRM, MOCK) or is_extra_storage(role):
            continue
        out += f"""
[hosts.{role}]
address = {json.dumps(h['address'])}
ssh_user = "root"
ssh_port = {h['ssh_port']}
"""
    return out


def _source_facts(role: str) -> dict[str, Any]:
    if role == MOUNTS:
        return {"description": "the default source (Debian 12, systemd) with a separate /boot and /var/log "
                               "(ext4) and a bind mount at /srv/data", "init": "systemd", "suite": "bookworm",
                "separate": sorted(t for t, _ in MOUNTS_FS.values()), "bind": MOUNTS_BIND[1]}
    r = _images.source_recipe(role)
    return {"description": r["description"], "init": r["init"], "suite": r["suite"]}


def _ours(lab: LabHandle, found: dict[str, Any]) -> bool:
    """Every host runs, started with this checkout's keys (another checkout's lab has other keys)."""
    return set(ROLES) <= set(found) and all(c.status == "running" and c.labels.get(STATE_LABEL) == str(lab.state)
                                            for c in found.values())


def parse_sources(spec: str | None) -> list[str]:
    """`--sources all` or a comma list of extra source hosts; empty for none."""
    if not spec:
        return []
    known = extra_sources()
    names = known if spec.strip() == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    bad = [n for n in names if n not in known]
    if bad:
        raise LabError(f"unknown lab source(s) {', '.join(bad)} (known: {', '.join(known)}, or all)")
    return names


def up(name: str = DEFAULT_NAME, sources: list[str] | tuple[str, ...] = (),
       export: str = exports.DEFAULT_KIND, storages: int = 1) -> dict[str, Any]:
    """Start the lab, or reuse it when every host already runs the current images and the same kind of
    /exports (`xfs` or `plain`); start the extra `sources` (see extra_sources()) and the storage servers beyond
    the first (`storages`, see extra_storages()) when they do not run yet. Returns its info."""
    more = extra_storages(storages)
    if export not in exports.KINDS:
        raise LabError(f"unknown export kind {export!r}: use one of {', '.join(exports.KINDS)}")
    lab = LabHandle(name)
    client = _client()
    tags = _images.build_all(client)
    found = _containers(client, lab)
    base = {r: c for r, c in found.items() if r in ROLES}
    reusable = (_ours(lab, found) and all(tags[r] in c.image.tags for r, c in base.items())
                and found["storage"].labels.get(EXPORT_LABEL) == export
                and (export != "xfs" or exports.is_ready(lab.state)))
    if not reusable:
        _start(lab, client, tags, export)
        found = _containers(client, lab)
    if sources:
        for role in sources:
            tags[role] = tags["source"] if role == MOUNTS else _images.build_source(client, role)
        stale = [r for r in sources if r not in found or tags[r] not in found[r].image.tags
                 or found[r].status != "running"]
        if stale:
            _start_sources(lab, client, stale, tags)
            found = _containers(client, lab)
    stale = [r for r in more if r not in found or tags["storage"] not in found[r].image.tags
             or found[r].status != "running"]
    if stale:
        _start_storages(lab, client, stale, tags["storage"])
        found = _containers(client, lab)
    _register_storages(lab, found)
    info = _info(lab, found)
    _probe_all(info)
    return info


def _password_files(lab: LabHandle) -> tuple[Path, Path]:
    """The administrator's and the viewer's password files, in the directory the openQRM server reads them
    from at its start (/lab): the files qrmfs's --password-file points at."""
    d = lab.state / "hosts" / OPENQRM
    d.mkdir(parents=True, exist_ok=True)
    d.chmod(0o700)
    files = []
    for fname, password in (("openqrm.password", OPENQRM_PASSWORD), ("viewer.password", VIEWER_PASSWORD)):
        f = d / fname
        f.write_text(password + "\n")
        f.chmod(0o600)
        files.append(f)
    return files[0], files[1]


def _register_storages(lab: LabHandle, found: dict[str, Any]) -> None:
    """A storage record (and the resource record with its IP) in the real server for each storage server
    of the lab, as an administrator adds them; kept when it is already there."""
    for role in ("storage", *sorted(r for r in found if is_extra_storage(r))):
        c = found[role]
        c.reload()
        net = c.attrs["NetworkSettings"]["Networks"][lab.network]
        _oq.register_storage(found[OPENQRM], role, net["IPAddress"], net["MacAddress"])
    _openqrm_facts(lab, found[OPENQRM], refresh=True)


def _openqrm_facts(lab: LabHandle, server: Any, refresh: bool = False) -> dict[str, Any]:
    """The server's nfs-deployment id and storage ids, read from its database when `up` registered the
    storages and kept in the state dir for that container (`status` works while its database is down)."""
    path = lab.state / "openqrm.json"
    if not refresh and path.exists():
        facts: dict[str, Any] = json.loads(path.read_text())
        if facts.get("container_id") == server.id:
            return facts
    facts = {"container_id": server.id, "nfs_deployment_id": _oq.deployment_id(server),
             "storage_ids": _oq.storage_ids(server)}
    path.write_text(json.dumps(facts, indent=2) + "\n")
    return facts


def _server(name: str) -> Any:
    lab = LabHandle(name)
    try:
        return _client().containers.get(lab.container_name(OPENQRM))
    except docker.errors.NotFound as e:
        raise LabError(f"lab {name} has no openQRM server (start it with `python -m lab up`)") from e


def openqrm_sql(name: str, query: str) -> list[dict[str, str | None]]:
    """Rows of a query in the real openQRM server's database (values as text, None for NULL)."""
    return _oq.sql(_server(name), query)


def images(name: str = DEFAULT_NAME) -> list[dict[str, str | None]]:
    """image_info, oldest id first (openQRM's own `openqrm` and `idle` records included)."""
    return openqrm_sql(name, "SELECT * FROM image_info ORDER BY image_id")


def events(name: str = DEFAULT_NAME) -> list[dict[str, str | None]]:
    """event_info in the order the server stored them (by event_id)."""
    return openqrm_sql(name, "SELECT * FROM event_info ORDER BY event_id")


def deployments(name: str = DEFAULT_NAME) -> list[dict[str, str | None]]:
    return openqrm_sql(name, "SELECT * FROM deployment_info ORDER BY deployment_id")


def storages(name: str = DEFAULT_NAME) -> list[dict[str, str | None]]:
    return openqrm_sql(name, "SELECT * FROM storage_info ORDER BY storage_id")


def resources(name: str = DEFAULT_NAME) -> list[dict[str, str | None]]:
    return openqrm_sql(name, "SELECT * FROM resource_info ORDER BY resource_id")


def openqrm_requests(name: str = DEFAULT_NAME) -> list[dict[str, Any]]:
    """What reached the real server: apache's access log as {method, path, query, status, user} dicts."""
    return _oq.requests(_server(name))


def openqrm_database(name: str, action: str) -> None:
    """`stop` or `start` the real server's MariaDB (apache keeps answering): for "database is down" tests."""
    _oq.database(_server(name), action)


def status(name: str = DEFAULT_NAME) -> dict[str, Any] | None:
    """The running lab's info, or None when it is not (fully) running with this checkout's keys."""
    lab = LabHandle(name)
    found = _containers(_client(), lab)
    if not _ours(lab, found):
        return None
    return _info(lab, found)


def down(name: str = DEFAULT_NAME, quiet: bool = False) -> list[str]:
    """Remove every container, network and volume of the lab, and its XFS export (unmounted, loop device
    detached, file removed). Returns what it removed."""
    lab = LabHandle(name)
    client = _client()
    removed: list[str] = []
    flt = {"label": f"{LABEL}={lab.name}"}
    for c in client.containers.list(all=True, filters=flt):
        c.remove(force=True, v=True)
        removed.append(f"container {c.name}")
    for n in client.networks.list(filters=flt):
        n.remove()
        removed.append(f"network {n.name}")
    for v in client.volumes.list(filters=flt):
        v.remove(force=True)
        removed.append(f"volume {v.name}")
    removed += _unmount_mounts(lab)
    removed += exports.release(lab.state)
    return removed
