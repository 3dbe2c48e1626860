"""The TOML configuration: storage servers by name, source host aliases, the openQRM server, ssh keys.

Found at --config, else $QRMFS_CONFIG, else ~/.config/qrmfs/config.toml, else /etc/qrmfs/config.toml.
Without any, a storage server can still be named by address (ssh as root, export root /exports).
"""

from __future__ import annotations

import difflib
import math
import os
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import model
from .agent.protocol import SPARE_DEFAULT, SPARE_POLICIES
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
    deployment_id: int | None = None  # that server's id of the nfs-deployment type (image_type of every record)


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


# --- the settings: each one declared once --------------------------------------------------------------------
# SETTINGS is the one list of what config.toml may hold: parse() reads every section through it, an unknown key
# or section is an error naming the closest known one, and docs/configuration.md's table is generated from it
# (`make docs`). A new setting is one Setting(...) line here, read from its section's values in parse().

Rule = Callable[[Any, str], Any]   # (value, "section.key") -> the value to use; raises ConfigError


@dataclass(frozen=True)
class Setting:
    section: str   # "" for the top level, "openqrm", "ssh", "storage.NAME", "hosts.NAME"
    key: str
    type: type | tuple[type, ...]
    default: Any
    doc: str       # what it is and its rule, for docs/configuration.md
    rule: Rule | None = None
    required: bool = False


def _check(rule: Any, value: Any, what: str) -> Any:
    """A model rule applied to a config value: its UsageError becomes a ConfigError (exit 3)."""
    try:
        return rule(value, what)
    except UsageError as e:
        raise ConfigError(f"config: {e.message}") from None


def _model(rule: Callable[[Any, str], Any]) -> Rule:
    return lambda v, what: _check(rule, v, what)


def _between(lo: int, hi: int) -> Rule:
    def rule(v: int, what: str) -> int:
        if not lo <= v <= hi:
            raise ConfigError(f"config: {what} must be {lo}-{hi}, not {v}")
        return v
    return rule


def _not_negative(v: int, what: str) -> int:
    if v < 0:
        raise ConfigError(f"config: {what} must be >= 0, not {v}")
    return v


def _number(positive: bool) -> Rule:
    def rule(v: float, what: str) -> float:
        v = float(v)
        if not math.isfinite(v) or v < 0 or (positive and v == 0):
            raise ConfigError(f"config: {what} must be a number {'>' if positive else '>='} 0, not {v:g}")
        return v
    return rule


def _deployment_id(v: int, what: str) -> int:
    if v <= 1:
        raise ConfigError(f"config: {what} must be openQRM's id of its nfs-deployment type (> 1: id 1 is its "
                          f"ramdisk deployment), not {v}")
    return v


def _path(rule: Rule | None = None) -> Rule:
    """A path setting: `~` expanded; empty means not set."""
    def expanded(v: str, what: str) -> str | None:
        p = os.path.expanduser(v)
        return (rule(p, what) if rule else p) if p else None
    return expanded


def _file(p: str, what: str) -> str:
    if not os.path.isfile(p):
        raise ConfigError(f"config: {what} {_shown(p)} is not a readable file")
    return p


def _ssh_path(own_word: bool) -> Rule:
    """[ssh] identity_file / known_hosts: ssh gets them as -i PATH and -o UserKnownHostsFile=PATH."""
    return _path(lambda p, what: _check(lambda v, w: model.ssh_value(v, w, own_word=own_word), p, what))


def _export_root(root: str, what: str) -> str:
    if not root.startswith("/") or root == "/" or os.path.normpath(root) != root or root.startswith("//"):
        raise ConfigError(f"config: {what} must be a canonical absolute path other than /")
    return _check(model.safe_path, root, what)


def _spool_dir(v: str, what: str) -> str:
    if not v or any(ord(c) < 32 or ord(c) == 127 for c in v):
        raise ConfigError(f"config: {what} {v!r} must be a path without control characters")
    return v


def _keep_generations(v: int, what: str) -> int:
    if v < 0:
        raise ConfigError(f"config: {what} must be 0 or more")
    return v


def _spare(v: str, what: str) -> str:
    if v not in SPARE_POLICIES:
        raise ConfigError(f"config: {what} must be one of {', '.join(SPARE_POLICIES)}, not {v!r}")
    return v


NUMBER = (int, float)
USER_RULE = "1-32 letters, digits, `_.-`, not starting with `-` or `.`"


def _ssh_host_settings(section: str, address: str) -> tuple[Setting, ...]:
    return (
        Setting(section, "address", str, None, address, _model(check_host), required=True),
        Setting(section, "ssh_user", str, "root", USER_RULE, _model(model.ssh_user)),
        Setting(section, "ssh_port", int, 22, "1-65535", _between(1, 65535)),
    )


SETTINGS: tuple[Setting, ...] = (
    Setting("", "spool_dir", str, "~/.local/state/qrmfs/spool", "where registrations wait until openQRM "
            "answers them (docs/registration.md); a path without control characters", _spool_dir),
    Setting("", "keep_generations", int, 1, "earlier generations kept beside an image (update, create/clone "
            "--force); 0 or more", _keep_generations),
    Setting("", "spare", str, SPARE_DEFAULT, "when the pruned generation is kept as the next update's start "
            "(docs/updating.md): `reflink` (where the file system shares extents), `always` or `never`", _spare),
    Setting("openqrm", "url", str, None, "`http(s)://HOST[:PORT][/PATH]`, without credentials, query or fragment",
            _model(model.openqrm_url)),
    Setting("openqrm", "user", str, None, "an openQRM administrator"),
    Setting("openqrm", "password_file", str, None, "a file whose first line is the password (chmod 600)",
            _path()),
    Setting("openqrm", "timeout", NUMBER, 10.0, "seconds per request, > 0", _number(positive=True)),
    Setting("openqrm", "retries", int, 4, "retries after the first attempt, 0-100", _between(0, 100)),
    Setting("openqrm", "backoff", NUMBER, 0.5, "seconds before the first retry, doubled each retry, >= 0",
            _number(positive=False)),
    Setting("openqrm", "ca_file", str, None, "a private CA for an https url (TLS is always verified); must exist",
            _path(_file)),
    Setting("openqrm", "deployment_id", int, None, "that server's deployment_info id of the nfs-deployment type, "
            "the image_type of every record (docs/openqrm.md); needed to register", _deployment_id),
    Setting("ssh", "identity_file", str, None, "the key that logs in to the storage servers and the sources; "
            "must not start with `-`, nor contain quotes, a backslash, `%` or control characters (`-i` is an "
            "argv word of its own, so spaces are fine)", _ssh_path(own_word=True)),
    Setting("ssh", "known_hosts", str, None, "their verified host keys; the rule of identity_file, and no white "
            "space either (ssh splits `UserKnownHostsFile` on it)", _ssh_path(own_word=False)),
    *_ssh_host_settings("storage.NAME", "host name or address, or `local` for the machine qrmfs runs on"),
    Setting("storage.NAME", "export_root", str, "/exports", "canonical, other than `/`, each component obeying "
            "the target path rule (docs/create.md)", _export_root),
    Setting("storage.NAME", "storage_id", int, None, "openQRM's storage_info id of this server, >= 0",
            _not_negative),
    Setting("storage.NAME", "nfs_address", str, None, "what `--route nfs` mounts (default: address)",
            _model(check_host)),
    *_ssh_host_settings("hosts.NAME", "host name or address"),
)
SECTIONS = tuple(dict.fromkeys(s.section for s in SETTINGS))


def _unknown(name: str, known: Iterable[str], where: str, *, section: bool = False) -> ConfigError:
    """`keep_generation = 5`, `[opnqrm]`, `exportroot = ...`: one line naming it and the closest known name."""
    known = sorted(known)
    close = difflib.get_close_matches(name, known, n=1)
    what = f"section [{name}]" if section else f"key {name!r} " + (f"in [{where}]" if where else "at the top level")
    hint = f"did you mean {'[' + close[0] + ']' if section else repr(close[0])}?" if close else \
        f"known: {', '.join(known)}"
    return ConfigError(f"config: unknown {what}; {hint}")


def _values(d: dict[str, Any], section: str, where: str) -> dict[str, Any]:
    """The settings of one section (`where` names it: "storage.nas1"), each type-checked and through its rule."""
    settings = {s.key: s for s in SETTINGS if s.section == section}
    for key in d:
        if key not in settings:
            raise _unknown(key, settings, where)
    out = {}
    for key, s in settings.items():
        what = f"{where}.{key}" if where else key
        v = d.get(key, s.default)
        if v is not None and (not isinstance(v, s.type) or (isinstance(v, bool) and s.type is not bool)):
            name = "number" if isinstance(s.type, tuple) else s.type.__name__
            raise ConfigError(f"config: {what} must be a {name}, not {type(v).__name__}")
        if s.required and not v:
            raise ConfigError(f"config: {where} needs an {key}")
        out[key] = s.rule(v, what) if s.rule is not None and v is not None else v
    return out


def _table(d: dict[str, Any], key: str, where: str = "") -> dict[str, Any]:
    v = d.get(key) or {}
    if not isinstance(v, dict):
        raise ConfigError(f"config: [{where}{key}] must be a table, not {type(v).__name__}")
    return v


def _named(data: dict[str, Any], table: str) -> dict[str, dict[str, Any]]:
    """[storage.NAME] / [hosts.NAME]: each NAME's values."""
    out = {}
    for name, d in _table(data, table).items():
        where = f"{table}.{name}"
        if not isinstance(d, dict):
            raise ConfigError(f"config: [{where}] must be a table")
        out[name] = _values(d, f"{table}.NAME", where)
    return out


def _ssh_host(v: dict[str, Any]) -> SshHost:
    return SshHost(bare_address(v["address"])[1], v["ssh_user"], v["ssh_port"])


def parse(data: dict[str, Any], path: str | None = None) -> Config:
    tables = {s.split(".")[0] for s in SECTIONS if s}
    top = {}
    for key, v in data.items():
        if key in tables:
            continue
        if isinstance(v, dict):
            raise _unknown(key, tables, "", section=True)
        top[key] = v
    t = _values(top, "", "")
    oq = _values(_table(data, "openqrm"), "openqrm", "openqrm")
    ssh = _values(_table(data, "ssh"), "ssh", "ssh")
    storage = {name: Storage(name, _ssh_host(v), v["export_root"], v["storage_id"], v["nfs_address"])
               for name, v in _named(data, "storage").items()}
    hosts = {name: _ssh_host(v) for name, v in _named(data, "hosts").items()}
    return Config(path, storage, hosts, OpenQrm(**oq), ssh["identity_file"], ssh["known_hosts"],
                  t["spool_dir"], t["keep_generations"], t["spare"])


def _shown(p: str) -> str:
    """A path as it goes into a one-line message: as is when printable, else quoted with escapes."""
    return p if p.isprintable() else repr(p)


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
