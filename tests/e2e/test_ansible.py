"""The Ansible collection against the lab with two storage servers (`lab up --storages 2`): the example playbook
(ansible/ansible_collections/qrmfs/qrmfs/examples/playbook.yml) run by ansible-playbook from the venv builds one
image per storage server from the source host in parallel, is idempotent, changes nothing in check mode, updates
after a source change, removes and deregisters; a storage server that cannot be reached fails only its own host.

The fleet is `plain` (the first storage container's /exports-plain) and `storage2` (the second container): two
servers, two qrmfs processes at once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lab import lab as _lab

from .helpers import run_on, write_config

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
COLLECTIONS = ROOT / "ansible"
PLAYBOOK = COLLECTIONS / "ansible_collections" / "qrmfs" / "qrmfs" / "examples" / "playbook.yml"
BIN = Path(sys.executable).parent
# where each inventory host's images go: (the container that holds them, the export root)
FLEET = {"plain": ("storage", _lab.PLAIN_ROOT), "storage2": ("storage2", _lab.EXPORT_ROOT)}
RECAP = re.compile(r"^(\S+)\s+:\s+ok=(\d+)\s+changed=(\d+)\s+unreachable=(\d+)\s+failed=(\d+)\s+skipped=(\d+)", re.M)


@pytest.fixture(scope="module")
def fleet(lab: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    # the session's lab (removed by its fixture if it started it), plus storage2
    info = _lab.up(lab["name"], storages=2)
    d = tmp_path_factory.mktemp("ansible")
    cfg = Path(write_config(info, d))
    # a storage server that does not answer (loopback, closed port): the failing host
    cfg.write_text(cfg.read_text() + '\n[storage.deadstore]\naddress = "127.0.0.1"\nssh_user = "root"\n'
                   'ssh_port = 1\nexport_root = "/exports"\n')
    inv = d / "inventory.ini"
    inv.write_text("[qrmfs_storage]\nplain export_root=/exports-plain\nstorage2 export_root=/exports\n")
    dead = d / "inventory-dead.ini"
    dead.write_text(inv.read_text() + "deadstore export_root=/exports\n")
    prefix = "ans_" + uuid.uuid4().hex[:6]
    probe = f"/etc/qrmfs-ansible-{prefix}"
    yield {"info": info, "config": str(cfg), "inventory": str(inv), "dead": str(dead), "prefix": prefix,
           "probe": probe, "dir": d}
    run_on(info, "source", f"rm -f {probe}", check=False)
    for host, (role, root) in FLEET.items():
        run_on(info, role, f"rm -rf {root}/{prefix}_{host} {root}/.{prefix}_{host}.qrmfs-*", check=False)


def play(fleet: dict[str, Any], *args: str, inventory: str | None = None) -> tuple[int, str, dict[str, dict[str, int]]]:
    """ansible-playbook on the example playbook; its exit code, output and PLAY RECAP per host."""
    argv = [str(BIN / "ansible-playbook"), "-i", inventory or fleet["inventory"], "-f", "5", str(PLAYBOOK),
            "-e", f"qrmfs_config={fleet['config']}", "-e", "golden=source:/", "-e", f"qrmfs_bin={BIN / 'qrmfs'}",
            "-e", f"image_prefix={fleet['prefix']}", *args]
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(fleet["dir"]), "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS),
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_HOST_KEY_CHECKING": "False", "LANG": "C.UTF-8"}
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=900)
    out = r.stdout + r.stderr
    recap = {m[0]: dict(zip(("ok", "changed", "unreachable", "failed", "skipped"), map(int, m[1:]), strict=True))
             for m in RECAP.findall(out)}
    return r.returncode, out, recap


def images_on(fleet: dict[str, Any]) -> dict[str, bool]:
    found = {}
    for host, (role, root) in FLEET.items():
        r = run_on(fleet["info"], role, f"test -d {root}/{fleet['prefix']}_{host}", check=False)
        found[host] = r.returncode == 0
    return found


def in_image(fleet: dict[str, Any], host: str, path: str) -> bool:
    role, root = FLEET[host]
    return run_on(fleet["info"], role, f"test -e {root}/{fleet['prefix']}_{host}{path}", check=False).returncode == 0


def manifest(fleet: dict[str, Any], host: str) -> dict[str, Any]:
    role, root = FLEET[host]
    r = run_on(fleet["info"], role, f"cat {root}/{fleet['prefix']}_{host}/.qrmfs/manifest.json")
    return dict(json.loads(r.stdout))


def registered(fleet: dict[str, Any]) -> dict[str, str]:
    """image name -> storage id, of this test's images in the real openQRM server's database."""
    return {str(i["image_name"]): str(i["image_storageid"]) for i in _lab.images(fleet["info"]["name"])
            if str(i["image_name"]).startswith(fleet["prefix"])}


def _t(iso: str) -> datetime:
    return datetime.fromisoformat(iso.replace("Z", "+00:00"))


@pytest.mark.slow
def test_fleet_playbook_lifecycle(fleet: dict[str, Any]) -> None:
    p = fleet["prefix"]
    sids = fleet["info"]["openqrm"]["storage_ids"]
    names = {f"{p}_plain": str(sids["storage"]), f"{p}_storage2": str(sids["storage2"])}

    # check mode on an empty fleet: both would be created, nothing is
    rc, out, recap = play(fleet, "--check", "--diff")
    assert rc == 0, out
    assert {h: recap[h]["changed"] for h in FLEET} == {"plain": 1, "storage2": 1}, out
    assert images_on(fleet) == {"plain": False, "storage2": False} and registered(fleet) == {}

    # the real run, with a third storage server that does not answer: it fails alone
    rc, out, recap = play(fleet, inventory=fleet["dead"])
    assert rc == 2, out  # some host failed
    assert recap["deadstore"]["failed"] == 1 and recap["deadstore"]["changed"] == 0, out
    assert re.search(r"fatal: \[deadstore\]: FAILED! => .*\"rc\": 15", out.replace("\n", " ")), out
    assert {h: (recap[h]["changed"], recap[h]["failed"]) for h in FLEET} == {"plain": (1, 0), "storage2": (1, 0)}
    assert images_on(fleet) == {"plain": True, "storage2": True}
    assert registered(fleet) == names  # each with its own storage's id
    m1, m2 = manifest(fleet, "plain"), manifest(fleet, "storage2")
    assert _t(m1["created"]) < _t(m2["finished"]) and _t(m2["created"]) < _t(m1["finished"]), \
        "the two builds did not overlap in time"

    # idempotent
    rc, out, recap = play(fleet)
    assert rc == 0 and {h: recap[h]["changed"] for h in FLEET} == {"plain": 0, "storage2": 0}, out

    # the golden host changes: check mode reports it and changes nothing; the update applies it; then no change
    run_on(fleet["info"], "source", f"echo 'changed by test_ansible' > {fleet['probe']}")
    rc, out, recap = play(fleet, "-e", "image_state=updated", "--check", "--diff")
    assert rc == 0 and {h: recap[h]["changed"] for h in FLEET} == {"plain": 1, "storage2": 1}, out
    assert f">f+++++++++ {fleet['probe']}" in out
    assert not any(in_image(fleet, h, fleet["probe"]) for h in FLEET)
    rc, out, recap = play(fleet, "-e", "image_state=updated", "-e", "keep_generations=0")
    assert rc == 0 and {h: recap[h]["changed"] for h in FLEET} == {"plain": 1, "storage2": 1}, out
    assert all(in_image(fleet, h, fleet["probe"]) for h in FLEET)
    assert manifest(fleet, "plain")["generation"]["changes"]["new"] >= 1  # the probe file
    rc, out, recap = play(fleet, "-e", "image_state=updated")
    assert rc == 0 and {h: recap[h]["changed"] for h in FLEET} == {"plain": 0, "storage2": 0}, out
    assert registered(fleet) == names  # an update keeps the records

    # absent: check mode keeps everything; then both are removed and deregistered; then nothing to do
    rc, out, recap = play(fleet, "-e", "image_state=absent", "--check")
    assert rc == 0 and {h: recap[h]["changed"] for h in FLEET} == {"plain": 1, "storage2": 1}, out
    assert images_on(fleet) == {"plain": True, "storage2": True} and registered(fleet) == names
    rc, out, recap = play(fleet, "-e", "image_state=absent")
    assert rc == 0 and {h: recap[h]["changed"] for h in FLEET} == {"plain": 1, "storage2": 1}, out
    assert images_on(fleet) == {"plain": False, "storage2": False} and registered(fleet) == {}
    rc, out, recap = play(fleet, "-e", "image_state=absent")
    assert rc == 0 and {h: recap[h]["changed"] for h in FLEET} == {"plain": 0, "storage2": 0}, out
