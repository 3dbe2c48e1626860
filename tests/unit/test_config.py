"""qrmfs/config.py: the TOML file, its type checks, and where it is found."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from qrmfs import config
from qrmfs.config import Config, OpenQrm, SshHost, Storage
from qrmfs.errors import ConfigError, UsageError

FULL = """
spool_dir = "/var/spool/qrmfs"

[storage.nas1]
address = "10.0.0.5"
ssh_user = "admin"
ssh_port = 2222
export_root = "/srv/exports"
storage_id = 7
nfs_address = "192.168.50.5"

[storage.nas2]
address = "nas2.example.org"

[hosts.web1]
address = "web1.example.org"
ssh_user = "op"
ssh_port = 22022

[openqrm]
url = "http://qrm.example.org/openqrm"
user = "openqrm"
password_file = "~/qrm.pw"
timeout = 3
retries = 6
backoff = 0.25

[ssh]
identity_file = "~/.ssh/qrmfs_ed25519"
known_hosts = "/etc/qrmfs/known_hosts"

[defaults]
arch = "x86_64"
"""


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("QRMFS_CONFIG", raising=False)
    monkeypatch.setattr(config, "SEARCH", (str(tmp_path / "home/.config/qrmfs/config.toml"),
                                           str(tmp_path / "etc/qrmfs/config.toml")))


def test_parse_full(tmp_path: Path) -> None:
    home = str(tmp_path / "home")
    c = config.parse(tomllib.loads(FULL), "/x/config.toml")
    assert c == Config(
        path="/x/config.toml",
        storage={"nas1": Storage("nas1", SshHost("10.0.0.5", "admin", 2222), "/srv/exports", 7, "192.168.50.5"),
                 "nas2": Storage("nas2", SshHost("nas2.example.org", "root", 22), "/exports", None, None)},
        hosts={"web1": SshHost("web1.example.org", "op", 22022)},
        openqrm=OpenQrm("http://qrm.example.org/openqrm", "openqrm", f"{home}/qrm.pw", 3.0, 6, 0.25),
        identity_file=f"{home}/.ssh/qrmfs_ed25519",
        known_hosts="/etc/qrmfs/known_hosts",
        spool_dir="/var/spool/qrmfs",
        defaults={"arch": "x86_64"},
    )
    assert isinstance(c.openqrm.timeout, float)


def test_parse_empty_gives_defaults() -> None:
    c = config.parse({})
    assert c == Config()
    assert c.openqrm == OpenQrm(None, None, None, 10.0, 4, 0.5)
    assert c.spool_dir == "~/.local/state/qrmfs/spool"


@pytest.mark.parametrize(("data", "message"), [
    ({"storage": {"s": {"address": 5}}}, "config: storage.s.address must be a str, not int"),
    ({"storage": {"s": {"address": "h", "ssh_port": "22"}}}, "config: storage.s.ssh_port must be a int, not str"),
    ({"storage": {"s": {"address": "h", "export_root": 1}}}, "config: storage.s.export_root must be a str, not int"),
    ({"storage": {"s": {"address": "h", "storage_id": "7"}}}, "config: storage.s.storage_id must be a int, not str"),
    ({"hosts": {"w": {"address": "h", "ssh_user": ["a"]}}}, "config: hosts.w.ssh_user must be a str, not list"),
    ({"openqrm": {"retries": 1.5}}, "config: openqrm.retries must be a int, not float"),
    ({"openqrm": {"url": 8080}}, "config: openqrm.url must be a str, not int"),
    ({"ssh": {"identity_file": True}}, "config: ssh.identity_file must be a str, not bool"),
    ({"storage": {"s": {}}}, "config: storage.s needs an address"),
    ({"storage": {"s": {"address": ""}}}, "config: storage.s needs an address"),
    ({"hosts": {"w": {"ssh_user": "x"}}}, "config: hosts.w needs an address"),
])
def test_type_errors_are_config_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config.parse(data)
    assert ei.value.message == message
    assert ei.value.exit_code == 3


@pytest.mark.parametrize("key", ["timeout", "backoff"])
def test_openqrm_float_type_error_is_config_error(key: str) -> None:
    with pytest.raises(ConfigError, match=f"config: openqrm.{key} must be a number, not str"):
        config.parse({"openqrm": {key: "10"}})


def test_openqrm_int_timeout_becomes_float() -> None:
    o = config.parse({"openqrm": {"timeout": 5, "backoff": 1}}).openqrm
    assert (o.timeout, o.backoff) == (5.0, 1.0)
    assert isinstance(o.timeout, float) and isinstance(o.backoff, float)


def test_bad_address_is_config_error_not_usage_error() -> None:
    with pytest.raises(ConfigError) as ei:
        config.parse({"storage": {"s": {"address": "-oProxyCommand=x"}}})
    assert not isinstance(ei.value, UsageError)
    assert ei.value.message.startswith("config: invalid storage.s.address '-oProxyCommand=x'")


@pytest.mark.parametrize("root", ["/", "exports", "/exports/", "/exports/../etc", "/exports/./x", ""])
def test_export_root_rules(root: str) -> None:
    with pytest.raises(ConfigError, match="storage.s.export_root must be a canonical absolute path other than /"):
        config.parse({"storage": {"s": {"address": "h", "export_root": root}}})


def test_export_root_good() -> None:
    assert config.parse({"storage": {"s": {"address": "h", "export_root": "/srv/nfs/images"}}}
                        ).storage["s"].export_root == "/srv/nfs/images"


def test_export_root_double_slash_refused() -> None:
    with pytest.raises(ConfigError):
        config.parse({"storage": {"s": {"address": "h", "export_root": "//exports"}}})


def test_bool_is_not_an_int() -> None:
    with pytest.raises(ConfigError, match="ssh_port must be a int, not bool"):
        config.parse({"storage": {"s": {"address": "h", "ssh_port": True}}})


@pytest.mark.parametrize("text", ['[storage]\nnas = "10.0.0.1"\n', 'hosts = ["a"]\n', 'openqrm = "http://x"\n',
                                  'storage = 5\n'])
def test_wrong_table_types_are_config_errors(text: str) -> None:
    with pytest.raises(ConfigError):
        config.parse(tomllib.loads(text))


# --- storage_for / host_for ------------------------------------------------------------------------

def test_storage_for_by_name_and_by_address() -> None:
    c = config.parse(tomllib.loads(FULL))
    assert c.storage_for("nas1") is c.storage["nas1"]
    assert c.storage_for("10.0.0.9") == Storage("10.0.0.9", SshHost("10.0.0.9", "root", 22), "/exports")
    assert c.storage_for("backup@nas9.example") == Storage("nas9.example", SshHost("nas9.example", "backup"))
    # an address that happens to equal a configured storage's address is NOT that storage (no port, no root)
    assert c.storage_for("10.0.0.5") == Storage("10.0.0.5", SshHost("10.0.0.5"), "/exports")


@pytest.mark.parametrize("token", ["-oProxyCommand=x", "bad host", "a;b"])
def test_storage_for_refuses_bad_address(token: str) -> None:
    with pytest.raises(UsageError, match="invalid storage server"):
        Config().storage_for(token)


def test_host_for() -> None:
    c = config.parse(tomllib.loads(FULL))
    assert c.host_for("web1") == SshHost("web1.example.org", "op", 22022)
    assert c.host_for("src2") == SshHost("src2", "root", 22)
    assert c.host_for("me@src2") == SshHost("src2", "me", 22)


def test_ssh_host_properties() -> None:
    assert SshHost("local").is_local
    assert SshHost("localhost-local").is_local
    assert not SshHost("localhost").is_local
    assert SshHost("nas", "admin").dest == "admin@nas"


# --- load ------------------------------------------------------------------------------------------

def _write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_load_explicit_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        config.load(str(tmp_path / "nope.toml"))
    assert ei.value.message == f"config file {tmp_path / 'nope.toml'} not found"
    assert ei.value.exit_code == 3


def test_load_explicit_directory_is_not_a_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        config.load(str(tmp_path))


def test_load_explicit(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.toml", FULL)
    c = config.load(str(p))
    assert c.path == str(p)
    assert c.storage["nas1"].storage_id == 7


def test_load_explicit_with_tilde(tmp_path: Path) -> None:
    _write(tmp_path / "home/my.toml", 'spool_dir = "/s"\n')
    assert config.load("~/my.toml").path == str(tmp_path / "home/my.toml")


def test_load_syntax_error_is_config_error(tmp_path: Path) -> None:
    p = _write(tmp_path / "c.toml", "[storage.nas1\naddress = 1\n")
    with pytest.raises(ConfigError) as ei:
        config.load(str(p))
    assert ei.value.message.startswith(f"config {p}: ")


def test_load_non_utf8_is_config_error(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_bytes(b'spool_dir = "/sp\xe4ol"\n')
    with pytest.raises(ConfigError):
        config.load(str(p))


def test_load_env_var(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path / "env.toml", 'spool_dir = "/from-env"\n')
    _write(tmp_path / "home/.config/qrmfs/config.toml", 'spool_dir = "/from-home"\n')
    monkeypatch.setenv("QRMFS_CONFIG", str(p))
    c = config.load()
    assert (c.path, c.spool_dir) == (str(p), "/from-env")


def test_load_explicit_beats_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QRMFS_CONFIG", str(_write(tmp_path / "env.toml", 'spool_dir = "/from-env"\n')))
    p = _write(tmp_path / "cli.toml", 'spool_dir = "/from-cli"\n')
    assert config.load(str(p)).spool_dir == "/from-cli"


def test_load_search_order(tmp_path: Path) -> None:
    assert config.load() == Config()
    _write(tmp_path / "etc/qrmfs/config.toml", 'spool_dir = "/from-etc"\n')
    assert config.load().spool_dir == "/from-etc"
    _write(tmp_path / "home/.config/qrmfs/config.toml", 'spool_dir = "/from-home"\n')
    assert config.load().spool_dir == "/from-home"


def test_load_env_var_missing_file_is_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _write(tmp_path / "home/.config/qrmfs/config.toml", 'spool_dir = "/from-home"\n')
    monkeypatch.setenv("QRMFS_CONFIG", str(tmp_path / "typo.toml"))
    with pytest.raises(ConfigError, match="typo.toml"):
        config.load()
