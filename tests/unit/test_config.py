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
    )
    assert isinstance(c.openqrm.timeout, float)


def test_parse_empty_gives_defaults() -> None:
    c = config.parse({})
    assert c == Config()
    assert c.openqrm == OpenQrm(None, None, None, 10.0, 4, 0.5)
    assert c.spool_dir == "~/.local/state/qrmfs/spool"
    assert (c.keep_generations, c.spare) == (1, "reflink")
    assert config.parse({"spare": "always", "keep_generations": 0}).spare == "always"


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
    ({"spare": "yes"}, "config: spare must be one of reflink, always, never, not 'yes'"),
    ({"keep_generations": -1}, "config: keep_generations must be 0 or more"),
])
def test_type_errors_are_config_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config.parse(data)
    assert ei.value.message == message
    assert ei.value.exit_code == 3


UNKNOWN = [
    ("keep_generation = 5\n", "config: unknown key 'keep_generation' at the top level; did you mean "
                               "'keep_generations'?"),
    ('[opnqrm]\nurl = "http://q/openqrm"\n', "config: unknown section [opnqrm]; did you mean [openqrm]?"),
    ('[storage.nas1]\naddress = "h"\nexportroot = "/srv"\n', "config: unknown key 'exportroot' in "
                                                                "[storage.nas1]; did you mean 'export_root'?"),
    ('[hosts.web1]\naddress = "h"\nssh_usr = "op"\n', "config: unknown key 'ssh_usr' in [hosts.web1]; "
                                                         "did you mean 'ssh_user'?"),
    ('[openqrm]\npassword = "secret"\n', "config: unknown key 'password' in [openqrm]; did you mean "
                                          "'password_file'?"),
    ('[ssh]\nport = 22\n', "config: unknown key 'port' in [ssh]; known: identity_file, known_hosts"),
    ('[storage.nas1]\naddress = "h"\n[storage.nas1.extra]\nx = 1\n',
     "config: unknown key 'extra' in [storage.nas1]; known: address, export_root, nfs_address, ssh_port, "
     "ssh_user, storage_id"),
    ("verbose = true\n", "config: unknown key 'verbose' at the top level; known: keep_generations, spare, "
                          "spool_dir"),
]


@pytest.mark.parametrize(("text", "message"), UNKNOWN, ids=[u[0].split("\n")[-2] for u in UNKNOWN])
def test_unknown_keys_and_sections_are_config_errors(text: str, message: str) -> None:
    """A typo is never ignored for the default: one line naming the key, its section and the closest known one."""
    with pytest.raises(ConfigError) as ei:
        config.parse(tomllib.loads(text))
    assert ei.value.message == message
    assert ei.value.exit_code == 3


def test_every_documented_example_key_is_known() -> None:
    """The README's first config and docs/configuration.md's example parse (a key they show is a key qrmfs
    reads), once their paths that must exist are left out."""
    root = Path(__file__).resolve().parents[2]
    for doc in (root / "README.md", root / "docs" / "configuration.md"):
        block = doc.read_text().split("```toml\n", 1)[1].split("```", 1)[0]
        data = tomllib.loads(block)
        data.get("openqrm", {}).pop("ca_file", None)
        config.parse(data)


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


# --- every setting validated at load time (issue 10: bad openQRM and ssh settings) --------------------------

@pytest.mark.parametrize(("data", "message"), [
    ({"openqrm": {"url": "notaurl"}}, "config: invalid openqrm.url 'notaurl': expected http(s)://HOST[:PORT]/PATH"),
    ({"openqrm": {"url": "ftp://q/openqrm"}}, "expected http(s)://HOST[:PORT]/PATH"),
    ({"openqrm": {"url": "http:///openqrm"}}, "expected http(s)://HOST[:PORT]/PATH"),
    ({"openqrm": {"url": "http://u:pw@q/openqrm"}}, "credentials do not belong in the URL"),
    ({"openqrm": {"url": "http://q/openqrm?x=1"}}, "no query or fragment"),
    ({"openqrm": {"url": "http://q:99999/openqrm"}}, "bad port"),
    ({"openqrm": {"url": "http://q /openqrm"}}, "white space or a control character"),
    ({"openqrm": {"url": "http://-oProxy/openqrm"}}, "invalid host in openqrm.url"),
    ({"openqrm": {"retries": -1}}, "config: openqrm.retries must be 0-100, not -1"),
    ({"openqrm": {"retries": 1000}}, "config: openqrm.retries must be 0-100, not 1000"),
    ({"openqrm": {"backoff": -1}}, "config: openqrm.backoff must be a number >= 0, not -1"),
    ({"openqrm": {"backoff": float("nan")}}, "config: openqrm.backoff must be a number >= 0, not nan"),
    ({"openqrm": {"timeout": 0}}, "config: openqrm.timeout must be a number > 0, not 0"),
    ({"openqrm": {"timeout": -3.5}}, "config: openqrm.timeout must be a number > 0, not -3.5"),
    ({"openqrm": {"timeout": float("inf")}}, "config: openqrm.timeout must be a number > 0, not inf"),
    ({"openqrm": {"ca_file": "/nonexistent/ca.pem"}}, "config: openqrm.ca_file /nonexistent/ca.pem is not a "
                                                       "readable file"),
    ({"storage": {"s": {"address": "h", "ssh_user": "-oProxyCommand=x"}}},
     "config: invalid storage.s.ssh_user '-oProxyCommand=x': 1-32 of letters"),
    ({"hosts": {"w": {"address": "h", "ssh_user": "a b"}}}, "config: invalid hosts.w.ssh_user 'a b'"),
    ({"hosts": {"w": {"address": "h", "ssh_user": ""}}}, "config: invalid hosts.w.ssh_user ''"),
    ({"storage": {"s": {"address": "h", "ssh_port": 0}}}, "config: storage.s.ssh_port must be 1-65535, not 0"),
    ({"storage": {"s": {"address": "h", "ssh_port": 65536}}}, "ssh_port must be 1-65535, not 65536"),
    ({"storage": {"s": {"address": "h", "nfs_address": "a;b"}}}, "config: invalid storage.s.nfs_address 'a;b'"),
    ({"storage": {"s": {"address": "h", "storage_id": -1}}}, "config: storage.s.storage_id must be >= 0, not -1"),
    ({"storage": {"s": {"address": "h", "export_root": "/srv/my exports"}}},
     "config: invalid storage.s.export_root '/srv/my exports': component 'my exports' must be 1-255 ASCII"),
    ({"storage": {"s": {"address": "h", "export_root": "/srv/.hidden"}}}, "component '.hidden'"),
    ({"ssh": {"known_hosts": "/etc/qrmfs/known hosts"}},
     "config: invalid ssh.known_hosts '/etc/qrmfs/known hosts': must not contain ' '"),
    ({"ssh": {"known_hosts": "/etc/%h_hosts"}}, "must not contain '%'"),
    ({"ssh": {"known_hosts": "-oProxyCommand=x"}}, "config: invalid ssh.known_hosts '-oProxyCommand=x': must not "
                                                   "start with '-'"),
    ({"ssh": {"identity_file": "-i/x"}}, "config: invalid ssh.identity_file '-i/x': must not start with '-'"),
    ({"ssh": {"identity_file": "/k\ney"}}, "must not contain '\\n'"),
    ({"spool_dir": "/sp\x00ool"}, "config: spool_dir '/sp\\x00ool' must be a path without control characters"),
    ({"spool_dir": ""}, "config: spool_dir '' must be a path"),
])
def test_bad_settings_are_config_errors(data: dict, message: str) -> None:
    with pytest.raises(ConfigError) as ei:
        config.parse(data)
    assert message in ei.value.message
    assert ei.value.message.startswith("config: ")
    assert "\n" not in ei.value.message
    assert ei.value.exit_code == 3


def test_good_openqrm_and_ssh_settings(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    c = config.parse({"openqrm": {"url": "https://[fd00::5]:8443/openqrm", "retries": 0, "backoff": 0,
                                  "timeout": 0.5, "ca_file": str(ca)},
                      "ssh": {"identity_file": "/my keys/id_ed25519", "known_hosts": "~/.ssh/known_hosts"},
                      "storage": {"s": {"address": "h", "ssh_user": "svc.qrmfs-1", "ssh_port": 65535}}})
    assert c.openqrm == OpenQrm("https://[fd00::5]:8443/openqrm", None, None, 0.5, 0, 0.0, str(ca))
    assert c.identity_file == "/my keys/id_ed25519"  # -i PATH is one argv word: ssh does not split it
    assert c.storage["s"].ssh.user == "svc.qrmfs-1"


def test_cli_bad_ssh_user_exits_3_before_anything(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from qrmfs import cli

    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'spool_dir = "{tmp_path}/spool"\n[storage.nas]\naddress = "127.0.0.1"\n'
                   'ssh_user = "-oProxyCommand=touch /tmp/pwned"\n')
    before = sorted(p.name for p in tmp_path.iterdir())
    code = cli.main(["create", "-t", "nas:/exports/img", "-l", str(tmp_path), "-o", "--config", str(cfg)])
    _, err = capsys.readouterr()
    assert code == 3
    assert err.splitlines() == ["qrmfs: error: config: invalid storage.nas.ssh_user "
                                "'-oProxyCommand=touch /tmp/pwned': 1-32 of letters, digits, '_', '.', '-', "
                                "not starting with '-' or '.'"]
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_path_with_a_newline_stays_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as ei:
        config.load(str(tmp_path / "a\nb.toml"))
    assert "\n" not in ei.value.message and "\\n" in ei.value.message
