"""What an operator meets first: --version, help that names its values in words and shows an example, shell
completion (typer's, with storage servers and hosts from the config), plain text without a terminal or with
NO_COLOR."""

from __future__ import annotations

import os
import pty
import re
import subprocess
import sys
from pathlib import Path

import pytest

import qrmfs
from qrmfs import cli

COMMANDS = ("create", "clone", "remove", "validate", "list", "flush", "check")


def qrmfs_proc(*args: str, env: dict[str, str] | None = None, **kw) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "qrmfs", *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})}, **kw)


def test_version(capsys):
    assert cli.main(["--version"]) == 0
    assert capsys.readouterr().out == f"qrmfs {qrmfs.__version__}\n"


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_values_in_words_and_shows_an_example(command, capsys):
    assert cli.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert not re.search(r"<[a-z][a-z_\[\], ]*>", out), out  # no <str>, <list[str]>, <bool>
    m = re.search(r"^  Example:\n    (qrmfs .*)$", out, re.M)
    assert m, out
    assert m.group(1).split()[1] == command
    if command in ("create", "validate", "remove", "clone"):
        assert "-t, --target STORAGE:/PATH" in out


def test_help_metavars():
    out = qrmfs_proc("create", "--help").stdout
    for opt in ("-l, --location HOST:/PATH", "-e, --exclude DIR", "--private-add DIR", "--password-file FILE",
                "--config FILE", "-s, --filesystem-image NAME", "--openqrm-url URL"):
        assert opt in out, opt


def test_top_level_help_lists_check_and_completion():
    out = qrmfs_proc("--help").stdout
    assert "--install-completion" in out and "--show-completion" in out and "--version" in out
    assert re.search(r"^  check +Check that everything create needs", out, re.M)


@pytest.fixture
def config(tmp_path: Path) -> dict[str, str]:
    cfg = tmp_path / "config.toml"
    cfg.write_text('[storage.nas1]\naddress = "nas1.lan"\nexport_root = "/srv/images"\n\n'
                   '[storage.nas2]\naddress = "nas2.lan"\n\n[hosts.web1]\naddress = "web1.lan"\n\n'
                   '[hosts.db1]\naddress = "db1.lan"\nssh_user = "admin"\n')
    return {"QRMFS_CONFIG": str(cfg)}


def complete(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> str:
    """One completion request, in process: typer answers it and exits, as it does for the shell."""
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as e:
        cli.main([])
    assert e.value.code == 0
    return capsys.readouterr().out


@pytest.fixture
def bash(config, monkeypatch, capsys):
    def ask(words: str) -> list[str]:
        cword = len(words.split()) - (0 if words.endswith(" ") else 1)
        return complete({**config, "_QRMFS_COMPLETE": "complete_bash", "COMP_WORDS": words,
                         "COMP_CWORD": str(cword)}, monkeypatch, capsys).split()
    return ask


def test_bash_completion_of_targets_and_locations_from_the_config(bash):
    assert bash("qrmfs create -t ") == ["nas1:/srv/images/", "nas2:/exports/"]
    assert bash("qrmfs create -t nas2") == ["nas2:/exports/"]
    assert bash("qrmfs create -t nas1:/srv/images/ -l ") == ["db1:/", "web1:/"]
    assert bash("qrmfs validate -l w") == ["web1:/"]
    assert bash("qrmfs clone --from n") == ["nas1:/srv/images/", "nas2:/exports/"]
    assert bash("qrmfs check -t ") == ["nas1:/srv/images/", "nas2:/exports/"]
    assert bash("qrmfs list ") == ["nas1", "nas2"]
    assert "check" in bash("qrmfs ch")


def test_completion_without_a_usable_config_suggests_nothing(tmp_path, monkeypatch, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[storage\n")
    out = complete({"QRMFS_CONFIG": str(bad), "_QRMFS_COMPLETE": "complete_bash", "COMP_WORDS": "qrmfs create -t ",
                    "COMP_CWORD": "3"}, monkeypatch, capsys)
    assert out.split() == []


def test_zsh_completion(config, monkeypatch, capsys):
    z = complete({**config, "_QRMFS_COMPLETE": "complete_zsh", "_TYPER_COMPLETE_ARGS": "qrmfs create -l "},
                 monkeypatch, capsys)
    assert '"web1\\\\:/":"root@web1.lan"' in z and '"db1\\\\:/":"admin@db1.lan"' in z


def test_fish_completion(config, monkeypatch, capsys):
    f = complete({**config, "_QRMFS_COMPLETE": "complete_fish", "_TYPER_COMPLETE_ARGS": "qrmfs remove -t ",
                  "_TYPER_COMPLETE_FISH_ACTION": "get-args"}, monkeypatch, capsys)
    assert f.splitlines() == ["nas1:/srv/images/\troot@nas1.lan", "nas2:/exports/\troot@nas2.lan"]


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_show_completion_script(shell):
    # typer detects the user's shell (shellingham); naming it is typer's documented test switch
    r = qrmfs_proc("--show-completion", shell, env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert r.returncode == 0, r.stderr
    assert re.search(rf"_QRMFS_COMPLETE[= ]complete_{shell}", r.stdout), r.stdout


def _stderr_on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    """Run qrmfs with stderr on a pseudo-terminal, so rich would colour it unless told not to."""
    master, slave = pty.openpty()
    try:
        p = subprocess.run([sys.executable, "-m", "qrmfs", *args], stdout=subprocess.PIPE, stderr=slave,
                           stdin=subprocess.DEVNULL, timeout=60, env=env)
        os.close(slave)
        slave = -1
        chunks = []
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:
                break
            if not data:
                break
            chunks.append(data)
        assert p.returncode in (0, 2), p
        return b"".join(chunks).decode(errors="replace")
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)


def test_no_color_gives_plain_text_on_a_terminal(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    cfg = tmp_path / "c.toml"  # the values a record needs: the dry run shows the job it would send
    cfg.write_text('[openqrm]\ndeployment_id = 2\n\n[storage.nas1]\naddress = "nas1.lan"\nstorage_id = 3\n')
    args = ["create", "-t", "nas1:/exports/img", "-l", str(src), "-u", "u", "-p", "pw",
            "--openqrm-url", "http://127.0.0.1:9/openqrm", "--dry-run", "--config", str(cfg)]
    base = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "FORCE_COLOR", "TERM")}
    base["HOME"] = str(tmp_path)
    coloured = _stderr_on_a_terminal(args, {**base, "TERM": "xterm-256color"})
    assert "-p/--password shows in the process list" in coloured
    assert "\x1b[" in coloured  # the warning is yellow on a terminal...
    plain = _stderr_on_a_terminal(args, {**base, "TERM": "xterm-256color", "NO_COLOR": "1"})
    assert "-p/--password shows in the process list" in plain
    assert "\x1b[" not in plain  # ...and plain with NO_COLOR
    piped = qrmfs_proc(*args, env={"HOME": str(tmp_path), "TERM": "xterm-256color"})
    assert "-p/--password shows" in piped.stderr and "\x1b[" not in piped.stderr + piped.stdout
