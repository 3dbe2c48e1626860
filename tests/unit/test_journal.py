"""qrmfs.journal: the summary line reaches a syslog socket (a unix datagram socket bound in tmp, as journald's
/dev/log is), from cli.main once per recorded command; nothing is sent where the socket is missing."""

from __future__ import annotations

import getpass
import os
import re
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from qrmfs import cli, journal


@pytest.fixture
def syslog(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "log")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    monkeypatch.setattr(journal, "DEV_LOG", path)
    monkeypatch.delenv("SUDO_USER", raising=False)
    yield s
    s.close()


def lines(s: socket.socket) -> list[str]:
    out = []
    s.setblocking(False)
    try:
        while True:
            out.append(s.recv(65536).decode())
    except BlockingIOError:
        pass
    return out


def test_record_sends_one_syslog_line_with_ident_qrmfs(syslog):
    assert journal.record("create", "nas1:/exports/web1", "ok", exit=0, source="web1:/")
    msg = syslog.recv(65536).decode()
    user = getpass.getuser()
    # <14> = facility user (1) * 8 + severity info (6); the tag `qrmfs[PID]:` is what journalctl -t matches
    assert msg == (f"<14>qrmfs[{os.getpid()}]: create target=nas1:/exports/web1 outcome=ok user={user} exit=0 "
                   "source=web1:/\x00")


def test_failure_is_logged_as_error_and_odd_values_are_quoted(syslog, monkeypatch):
    monkeypatch.setenv("SUDO_USER", "alice")
    journal.record("remove", "nas1:/exports/a b", "refused", exit=11)
    msg = syslog.recv(65536).decode()
    assert msg.startswith("<11>qrmfs[")  # user.err
    assert "target='nas1:/exports/a b' outcome=refused" in msg and "sudo_user=alice" in msg


def test_no_socket_no_record_and_no_noise(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(journal, "DEV_LOG", str(tmp_path / "absent"))
    assert journal.record("create", "x:/exports/y", "ok") is False
    assert capsys.readouterr() == ("", "")


def test_socket_that_refuses_is_silent(tmp_path, monkeypatch, capsys):
    dead = tmp_path / "dead"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(dead))
    s.close()  # the path exists, nobody listens
    monkeypatch.setattr(journal, "DEV_LOG", str(dead))
    journal.record("create", "x:/exports/y", "ok")
    assert capsys.readouterr() == ("", "")


def test_cli_main_records_the_outcome_of_a_changing_command(syslog, tmp_path, capsys):
    missing = tmp_path / "nope.toml"
    rc = cli.main(["remove", "-t", "nas1:/exports/web1", "--yes", "-p", "Sekrit-99", "--config", str(missing)])
    assert rc == 3
    msgs = lines(syslog)
    assert len(msgs) == 1
    assert re.fullmatch(r"<11>qrmfs\[\d+\]: remove target=nas1:/exports/web1 outcome=config user=\S+ exit=3\x00",
                        msgs[0]), msgs
    assert "Sekrit-99" not in msgs[0]


def test_cli_main_does_not_record_read_only_runs(syslog, tmp_path, capsys):
    cfg = tmp_path / "nope.toml"
    for args in (["list", "--config", str(cfg)], ["validate", "-t", "a:/exports/b", "--config", str(cfg)],
                 ["create", "-t", "a:/exports/b", "-l", "/", "--dry-run", "--config", str(cfg)],
                 ["create", "--help"], ["--version"], ["check", "--config", str(cfg)]):
        cli.main(args)
    assert lines(syslog) == []


@pytest.mark.parametrize(("rc", "kind"), [(0, "ok"), (2, "usage"), (8, "transfer"), (13, "registration"),
                                          (15, "check_failed"), (130, "interrupted"), (99, "error")])
def test_kind_of_exit_code(rc, kind):
    assert journal.kind_of(rc) == kind


def test_record_cli_reads_target_and_source_in_both_option_forms(syslog):
    assert journal.record_cli(["clone", "-s", "b", "--target=nas1:/exports/b", "--from", "nas1:/exports/a"], 0)
    assert journal.record_cli(["validate", "-t", "nas1:/exports/b", "-f"], 12)
    first, second = lines(syslog)
    assert "clone target=nas1:/exports/b outcome=ok" in first and first.endswith("exit=0 source=nas1:/exports/a\x00")
    assert "validate target=nas1:/exports/b outcome=invalid" in second and "exit=12" in second
