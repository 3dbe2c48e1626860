"""qrmfs/actions/hosts.py: the run's own ssh-agent (real ssh-agent and ssh-add, no network)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from qrmfs.actions import hosts
from qrmfs.runner import Runner


def _keys(sock: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ssh-add", "-l"], env={**os.environ, "SSH_AUTH_SOCK": sock}, capture_output=True,
                          text=True)


def test_the_runs_agent_starts_empty_holds_the_key_only_while_asked_and_is_gone_when_stopped(tmp_path: Path) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qrmfs-unit", "-f", str(key)], check=True)
    agent = hosts.PrivateAgent(Runner())
    try:
        assert os.path.exists(agent.sock)
        assert _keys(agent.sock).returncode == 1  # listening, and holding nothing
        with hosts.ssh_agent(Runner(), str(key), agent) as env:
            assert env == {"SSH_AUTH_SOCK": agent.sock}
            assert "qrmfs-unit" in _keys(agent.sock).stdout
        assert _keys(agent.sock).returncode == 1  # the key went with the copy; the agent stays for the run
        daemon = hosts._agent_pid(agent._agent.pid)  # as stop() reads it (not at start: nothing waits for it)
        assert daemon is not None and hosts._running(daemon)
    finally:
        agent.stop()
    assert not os.path.exists(agent.dir)
    assert not hosts._running(daemon)


def test_an_agent_stopped_as_soon_as_it_listens_leaves_no_daemon() -> None:
    """Its daemon pid is read when it stops (waiting for its command's exec if needed), never left unknown: no
    process with its socket in its command line outlives stop()."""
    agent = hosts.PrivateAgent(Runner())
    agent.stop()
    assert _with_arg(agent.sock) == []
    assert agent._daemon is None and not os.path.exists(agent.dir)


def _with_arg(arg: str) -> list[int]:
    """Running processes (not zombies) whose command line has `arg`."""
    found = []
    for p in os.listdir("/proc"):
        try:
            if p.isdigit() and arg.encode() in Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") \
                    and hosts._running(int(p)):
                found.append(int(p))
        except OSError:
            pass
    return found


def test_the_agents_pid_is_read_once_its_command_has_it_not_before() -> None:
    """ssh-agent makes its socket before its command has $SSH_AGENT_PID (it forks, then execs the command):
    the pid is waited for, not read too early as nothing (the daemon would then outlive qrmfs)."""
    p = subprocess.Popen(["sh", "-c", "sleep 0.3; exec env SSH_AGENT_PID=4242 sleep 30"])
    try:
        assert hosts._agent_pid(p.pid) == 4242
    finally:
        p.kill()
        p.wait()
    assert hosts._agent_pid(p.pid, timeout=1) is None  # gone: nothing to wait for


def test_without_the_runs_agent_a_copy_gets_one_of_its_own_for_its_duration(tmp_path: Path) -> None:
    key = tmp_path / "id"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "qrmfs-unit", "-f", str(key)], check=True)
    with hosts.ssh_agent(Runner(), str(key)) as env:
        sock = env["SSH_AUTH_SOCK"]
        assert "qrmfs-unit" in _keys(sock).stdout
    assert not os.path.exists(sock)
