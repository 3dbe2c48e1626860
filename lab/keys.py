"""The lab's ssh material: one client key, one host key per host, and a known_hosts that names them."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def _keygen(path: Path, comment: str) -> None:
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


def ensure_keys(state: Path, roles: tuple[str, ...]) -> Path:
    """Create (once) the client key and each host's key; each host dir is bind-mounted at /lab."""
    client = state / "id_ed25519"
    _keygen(client, "qrmfs-lab client")
    for role in roles:
        hostdir = state / "hosts" / role
        _keygen(hostdir / "ssh_host_ed25519_key", f"qrmfs-lab {role}")
        auth = hostdir / "authorized_keys"
        shutil.copyfile(client.with_suffix(".pub"), auth)
        auth.chmod(0o600)
        hostdir.chmod(0o700)
    return client


def write_known_hosts(state: Path, addresses: dict[str, str]) -> Path:
    """known_hosts with each host's real key under its address and its lab alias; no blanket trust."""
    lines = []
    for role, address in sorted(addresses.items()):
        keytype, key = (state / "hosts" / role / "ssh_host_ed25519_key.pub").read_text().split()[:2]
        lines.append(f"{address},{role} {keytype} {key}\n")
    path = state / "known_hosts"
    path.write_text("".join(lines))
    return path
