"""Hostile input through the real CLI (qrmfs.cli.main) against a `local` storage server in a tmp dir:
every path component of a target, every option and every config value. Each bad value is refused with
ONE line on stderr and its documented exit code (2: bad input, 3: bad config), and nothing appears, changes
or is spooled under the tmp dir (the export root, the spool, a lock, a staging copy)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qrmfs import cli

FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")
# Whatever text a test draws, never a NUL (argv cannot carry it) and never a leading '-' for click to parse.
TEXT = st.text(alphabet=st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=16)


@pytest.fixture
def lab(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hostile")
    home = tmp / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("QRMFS_CONFIG", raising=False)
    monkeypatch.delenv("QRMFS_PASSWORD", raising=False)
    src = tmp / "src"
    (src / "etc").mkdir(parents=True)
    root = tmp / "exports"
    cfg = tmp / "config.toml"
    cfg.write_text(f'spool_dir = "{tmp}/spool"\n\n[storage.local]\naddress = "local"\nexport_root = "{root}"\n\n'
                   '[openqrm]\nurl = "http://127.0.0.1:9/openqrm"\nuser = "openqrm"\n')
    return {"tmp": tmp, "src": src, "root": root, "cfg": cfg}


def tree(base: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), base) for d, ds, fs in os.walk(base) for n in ds + fs)


def refused(lab: dict[str, Path], capsys: pytest.CaptureFixture[str], args: list[str], code: int) -> str:
    before = tree(lab["tmp"])
    rc = cli.main(args)
    out, err = capsys.readouterr()
    assert rc == code, (args, err)
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("qrmfs: error: "), (args, err)
    assert out == ""
    assert tree(lab["tmp"]) == before, args  # nothing created, changed or spooled
    return lines[0]


def create(lab: dict[str, Path], *opts: str, target: str | None = None) -> list[str]:
    t = target or f"local:{lab['root']}/img1"
    return ["create", f"--target={t}", f"--location={lab['src']}", "-o",
            "--config", str(lab["cfg"]), *opts]


@FAST
@given(good=st.lists(st.from_regex(COMPONENT, fullmatch=True).filter(lambda c: c not in (".", "..")), max_size=2),
       bad=TEXT.filter(lambda c: "/" not in c and not COMPONENT.fullmatch(c)), at=st.integers(0, 2))
def test_any_bad_target_component_is_refused_before_anything(lab: dict[str, Path],
                                                             capsys: pytest.CaptureFixture[str],
                                                             good: list[str], bad: str, at: int) -> None:
    parts = list(good)
    parts.insert(min(at, len(parts)), bad)
    target = f"local:{lab['root']}/" + "/".join([*parts, "img1"])
    refused(lab, capsys, create(lab, target=target), 2)


def test_the_issue_example_creates_no_directory_and_no_lock(lab: dict[str, Path],
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(lab, capsys, create(lab, target=f"local:{lab['root']}/x;touch {lab['tmp']}/p/img"), 2)
    assert "component 'x;touch '" in line
    assert not (lab["tmp"] / "p").exists()


def test_url_spelling_of_a_target(lab: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    line = refused(lab, capsys, create(lab, target="storage://exports/img"), 2)
    assert line == ("qrmfs: error: invalid target 'storage://exports/img': STORAGE:/path, not a URL "
                    "(did you mean 'storage:/exports/img'?)")


# every option with a value: a draw that the option's own rule refuses
OPTION_RULES = [
    ("--filesystem-image", lambda v: v != "img1"),
    ("--hostname", lambda v: not re.fullmatch(r"(?=.{1,253}$)[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                                              r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*", v)),
    ("--arch", lambda v: not re.fullmatch(r"[A-Za-z0-9_.+-]{1,32}", v)),
    ("--operation-system", lambda v: not re.fullmatch(r"[A-Za-z0-9_.+ -]{1,64}", v)),
    ("--route", lambda v: v not in ("ssh", "nfs")),
    ("--private-add", lambda v: not re.fullmatch(r"/[A-Za-z0-9_./+@-]+", v) or "//" in v or v.endswith("/")
     or "/./" in v + "/" or "/../" in v + "/" or v.startswith(("/proc", "/sys", "/dev", "/run", "/.qrmfs"))),
    ("--exclude", lambda v: not v.startswith("/") or any(ord(c) < 32 or ord(c) == 127 for c in v)
     or any(c in v for c in "*?[]\\") or os.path.normpath(v) != v or v.startswith("//") or v == "/"),
    ("--openqrm-url", lambda v: not re.fullmatch(r"https?://[A-Za-z0-9][A-Za-z0-9.-]*(:[0-9]{1,5})?(/[A-Za-z0-9/]*)?",
                                                 v)),
]


@FAST
@given(case=st.sampled_from(OPTION_RULES), value=TEXT, prefix=st.sampled_from(["", "/", "/var/", "http://"]))
def test_every_option_refuses_what_its_rule_refuses(lab: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                    case: tuple, value: str, prefix: str) -> None:
    option, is_bad = case
    v = prefix + value
    if not is_bad(v):
        return
    refused(lab, capsys, create(lab, f"{option}={v}"), 2)


@pytest.mark.parametrize("url", ["notaurl", "http://u:pw@127.0.0.1/openqrm", "ftp://q/o", "http://q/o?x=1"])
def test_bad_openqrm_url_option_exits_2(lab: dict[str, Path], capsys: pytest.CaptureFixture[str], url: str) -> None:
    line = refused(lab, capsys, create(lab, f"--openqrm-url={url}"), 2)
    assert "--openqrm-url" in line
    assert "pw" not in line.replace("--openqrm-url", "")  # never echo credentials from a URL


def test_bad_openqrm_url_in_flush_exits_2(lab: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    refused(lab, capsys, ["flush", "--openqrm-url=notaurl", "--config", str(lab["cfg"])], 2)


# config values: every key that takes a string, with a hostile value: exit 3, one line, nothing touched
CONFIG_KEYS = [("storage.local", "ssh_user"), ("storage.local", "address"), ("storage.local", "export_root"),
               ("storage.local", "nfs_address"), ("ssh", "known_hosts"), ("ssh", "identity_file"),
               ("openqrm", "url"), ("openqrm", "ca_file")]
HOSTILE = ["-oProxyCommand=touch /tmp/x", "a b", "a;b", "$(id)", "`id`", "a\tb", "%h", "a'b", "~/x y", "ü",
           "/a b", "/x/-y z", "http://", "/.\u2028", ""]


@FAST
@given(key=st.sampled_from(CONFIG_KEYS), value=st.one_of(st.sampled_from(HOSTILE), TEXT))
def test_hostile_config_values_exit_3_or_are_safe(lab: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                  key: tuple[str, str], value: str) -> None:
    import tomllib

    table, name = key
    base = tomllib.loads(lab["cfg"].read_text())
    d = base
    for part in table.split("."):
        d = d.setdefault(part, {})
    d[name] = value
    text = _toml(base)
    cfgfile = lab["tmp"] / "hostile.toml"
    cfgfile.write_text(text)
    try:
        from qrmfs import config
        from qrmfs.errors import ConfigError

        try:
            c = config.parse(tomllib.loads(text))
        except ConfigError as e:
            assert "\n" not in e.message
            cfgfile.unlink()
            refused(lab, capsys, ["create", f"--target=local:{lab['root']}/img1", f"--location={lab['src']}",
                                  "-o", "--dry-run", "--config", str(cfgfile)], 3)
            return
        # accepted: then it is safe where it goes
        for v in (c.known_hosts, c.identity_file, *(s.ssh.user for s in c.storage.values())):
            assert v is None or not v.startswith("-")
        if c.known_hosts:
            assert not any(ch.isspace() or ch in "%'\"\\" for ch in c.known_hosts)
    finally:
        cfgfile.unlink(missing_ok=True)


def _toml_str(v: str) -> str:
    return '"' + "".join(f"\\u{ord(c):04x}" if ord(c) < 32 or ord(c) == 127 or c in '"\\' else c for c in v) + '"'


def _toml(d: dict, prefix: str = "") -> str:
    lines, tables = [], []
    for k, v in d.items():
        if isinstance(v, dict):
            tables.append((k, v))
        else:
            lines.append(f"{k} = {_toml_str(v)}")
    out = "\n".join(lines) + "\n"
    for k, v in tables:
        name = f"{prefix}.{k}" if prefix else k
        if any(not isinstance(x, dict) for x in v.values()):
            out += f"[{name}]\n"
        out += _toml(v, name)
    return out


HOST = re.compile(r"(?:[A-Za-z0-9_][A-Za-z0-9_.-]{0,31}@)?(?:[A-Za-z0-9][A-Za-z0-9._-]{0,252}|\[[0-9A-Fa-f:.]+\])")


@FAST
@given(host=TEXT.filter(lambda h: ":" not in h and "/" not in h and not HOST.fullmatch(h)), path=st.sampled_from(
    ["/", "/srv", "/a b"]))
def test_a_hostile_source_host_is_refused_before_anything(lab: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                                          host: str, path: str) -> None:
    args = create(lab)
    args[2] = f"--location={host}:{path}"
    refused(lab, capsys, args, 2)
