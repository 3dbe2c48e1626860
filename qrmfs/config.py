"""The TOML configuration: storage servers by name, source host aliases, the openQRM server, ssh keys.

Found at --config, else $QRMFS_CONFIG, else ~/.config/qrmfs/config.toml, else /etc/qrmfs/config.toml.
Without any, a storage server can still be named by address (ssh as root, export root /exports).
"""

from __future__ import annotations

import math
import os
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import model
from .agent.protocol import NODE_TIMEOUT_DEFAULT, SPARE_DEFAULT, SPARE_POLICIES
from .errors import ConfigError, UsageError
from .model import bare_address
from .model import host as check_host

SEARCH = ("~/.config/qrmfs/config.toml", "/etc/qrmfs/config.toml")
LOCAL = ("local", "localhost-local")


@dataclass(frozen=True)
class SshHost:
    """A host qrmfs reaches over ssh (or `local`, the machine qrmfs runs on)."""
    address: str
    user: str = "root"
    port: int = 22

    @property
    def is_local(self) -> bool:
        return self.address in LOCAL

    @property
    def dest(self) -> str:
        return f"{self.user}@{self.address}"


@dataclass(frozen=True)
class Storage:
    name: str
    ssh: SshHost
    export_root: str = "/exports"
    storage_id: int | None = None
    nfs_address: str | None = None  # what `mount -t nfs` uses; default the ssh address


@dataclass(frozen=True)
class OpenQrm:
    url: str | None = None
    user: str | None = None
    password_file: str | None = None
    timeout: float = 10.0
    retries: int = 4
    backoff: float = 0.5
    ca_file: str | None = None   # CA bundle for an https URL; TLS is always verified


@dataclass(frozen=True)
class Config:
    path: str | None = None
    storage: dict[str, Storage] = field(default_factory=dict)
    hosts: dict[str, SshHost] = field(default_factory=dict)
    openqrm: OpenQrm = OpenQrm()
    identity_file: str | None = None
    known_hosts: str | None = None
    spool_dir: str = "~/.local/state/qrmfs/spool"
    keep_generations: int = 1  # earlier generations of an image kept by update (and create --force)
    spare: str = SPARE_DEFAULT  # when a pruned generation is kept as the next update's start (SPARE_POLICIES)
    node_timeout: int = NODE_TIMEOUT_DEFAULT  # seconds after a node's last heartbeat that it stops holding its
    #                                           generation (agent/holds.py)

    def storage_for(self, token: str) -> Storage:
        """A storage server by its config name, else by address (ssh as root, port 22, export root /exports)."""
        if token in self.storage:
            return self.storage[token]
        check_host(token, "storage server")
        user, addr = bare_address(token)
        return Storage(name=addr, ssh=SshHost(addr, user or "root"))

    def host_for(self, token: str) -> SshHost:
        if token in self.hosts:
            return self.hosts[token]
        user, addr = bare_address(token)
        return SshHost(addr, user or "root")


def _get(d: dict[str, Any], key: str, typ: type | tuple[type, ...], where: str, default: Any = None) -> Any:
    v = d.get(key, default)
    wrong = v is not None and (not isinstance(v, typ) or (isinstance(v, bool) and typ is not bool))
    if wrong:
        name = "number" if isinstance(typ, tuple) else typ.__name__
        raise ConfigError(f"config: {where}.{key} must be a {name}, not {type(v).__name__}")
    return v


def _table(d: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    v = d.get(key) or {}
    if not isinstance(v, dict):
        raise ConfigError(f"config: [{where}{key}] must be a table, not {type(v).__name__}")
    return v


def _check(rule: Any, value: Any, what: str) -> Any:
    """A model rule applied to a config value: its UsageError becomes a ConfigError (exit 3)."""
    try:
        return rule(value, what)
    except UsageError as e:
        raise ConfigError(f"config: {e.message}") from None


def _ssh_host(d: dict[str, Any], where: str) -> SshHost:
    addr = _get(d, "address", str, where)
    if not addr:
        raise ConfigError(f"config: {where} needs an address")
    _check(check_host, addr, f"{where}.address")
    user = _check(model.ssh_user, _get(d, "ssh_user", str, where, "root"), f"{where}.ssh_user")
    port = _get(d, "ssh_port", int, where, 22)
    if not 1 <= port <= 65535:
        raise ConfigError(f"config: {where}.ssh_port must be 1-65535, not {port}")
    return SshHost(bare_address(addr)[1], user, port)


def _number(o: dict[str, Any], key: str, default: float, *, positive: bool) -> float:
    v = float(_get(o, key, (int, float), "openqrm", default))
    if not math.isfinite(v) or v < 0 or (positive and v == 0):
        raise ConfigError(f"config: openqrm.{key} must be a number {'>' if positive else '>='} 0, not {v:g}")
    return v


def _openqrm(o: dict[str, Any]) -> OpenQrm:
    url = _get(o, "url", str, "openqrm")
    if url is not None:
        _check(model.openqrm_url, url, "openqrm.url")
    retries = _get(o, "retries", int, "openqrm", 4)
    if not 0 <= retries <= 100:
        raise ConfigError(f"config: openqrm.retries must be 0-100, not {retries}")
    ca_file = _expand(_get(o, "ca_file", str, "openqrm"))
    if ca_file is not None and not os.path.isfile(ca_file):
        raise ConfigError(f"config: openqrm.ca_file {_shown(ca_file)} is not a readable file")
    return OpenQrm(url, _get(o, "user", str, "openqrm"), _expand(_get(o, "password_file", str, "openqrm")),
                   _number(o, "timeout", 10.0, positive=True), retries, _number(o, "backoff", 0.5, positive=False),
                   ca_file)


def _ssh_path(d: dict[str, Any], key: str) -> str | None:
    """[ssh] identity_file / known_hosts: ssh gets them as -i PATH and -o UserKnownHostsFile=PATH."""
    p = _expand(_get(d, key, str, "ssh"))
    if p is None:
        return None
    try:
        return model.ssh_value(p, f"ssh.{key}", own_word=key == "identity_file")
    except UsageError as e:
        raise ConfigError(f"config: {e.message}") from None


def parse(data: dict[str, Any], path: str | None = None) -> Config:
    storage = {}
    for name, s in _table(data, "storage").items():
        where = f"storage.{name}"
        if not isinstance(s, dict):
            raise ConfigError(f"config: [{where}] must be a table")
        root = _get(s, "export_root", str, where, "/exports")
        if not root.startswith("/") or root == "/" or os.path.normpath(root) != root or root.startswith("//"):
            raise ConfigError(f"config: {where}.export_root must be a canonical absolute path other than /")
        _check(model.safe_path, root, f"{where}.export_root")
        nfs = _get(s, "nfs_address", str, where)
        if nfs is not None:
            _check(check_host, nfs, f"{where}.nfs_address")
        sid = _get(s, "storage_id", int, where)
        if sid is not None and sid < 0:
            raise ConfigError(f"config: {where}.storage_id must be >= 0, not {sid}")
        storage[name] = Storage(name, _ssh_host(s, where), root, sid, nfs)
    hosts = {}
    for name, h in _table(data, "hosts").items():
        if not isinstance(h, dict):
            raise ConfigError(f"config: [hosts.{name}] must be a table")
        hosts[name] = _ssh_host(h, f"hosts.{name}")
    oq = _openqrm(_table(data, "openqrm"))
    ssh = _table(data, "ssh")
    spool = _get(data, "spool_dir", str, "", "~/.local/state/qrmfs/spool")
    if not spool or any(ord(c) < 32 or ord(c) == 127 for c in spool):
        raise ConfigError(f"config: spool_dir {spool!r} must be a path without control characters")
    return Config(path, storage, hosts, oq, _ssh_path(ssh, "identity_file"), _ssh_path(ssh, "known_hosts"),
                  spool, *_generations(data))


def _generations(data: dict[str, Any]) -> tuple[int, str, int]:
    """keep_generations, spare (see gens.prune) and node_timeout (see holds.py)."""
    keep = _get(data, "keep_generations", int, "", 1)
    if keep < 0:
        raise ConfigError("config: keep_generations must be 0 or more")
    spare = _get(data, "spare", str, "", SPARE_DEFAULT)
    if spare not in SPARE_POLICIES:
        raise ConfigError(f"config: spare must be one of {', '.join(SPARE_POLICIES)}, not {spare!r}")
    timeout = _get(data, "node_timeout", int, "", NODE_TIMEOUT_DEFAULT)
    if timeout < 1:
        raise ConfigError("config: node_timeout must be 1 second or more")
    return keep, spare, timeout


def _shown(p: str) -> str:
    """A path as it goes into a one-line message: as is when printable, else quoted with escapes."""
    return p if p.isprintable() else repr(p)


def _expand(p: str | None) -> str | None:
    return os.path.expanduser(p) if p else None


def load(explicit: str | None = None) -> Config:
    explicit = explicit or os.environ.get("QRMFS_CONFIG") or None
    candidates = [explicit] if explicit else list(SEARCH)
    for c in candidates:
        if not c:
            continue
        p = Path(c).expanduser()
        if p.is_file():
            try:
                return parse(tomllib.loads(p.read_text()), str(p))
            except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
                raise ConfigError(f"config {_shown(str(p))}: {e}") from None
            except OSError as e:
                raise ConfigError(f"config {_shown(str(p))}: {e.strerror}") from None
        if explicit:
            raise ConfigError(f"config file {_shown(c)} not found")
    return Config()
