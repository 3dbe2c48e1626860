"""`make demo`: the main job against the lab. Starts the lab, creates an image of the lab's source host on
its storage server, registers it with the lab's real openQRM 5.3.60 server, validates and lists it, and shows the
record from the server's database."""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from . import lab as _lab

IMAGE = "demo"


def _run(title: str, *args: str, config: str) -> int:
    argv = [sys.executable, "-m", "qrmfs", *args, "--config", config]
    print(f"\n$ qrmfs {' '.join(args)} --config {config}", flush=True)
    return subprocess.run(argv).returncode


def main(name: str = _lab.DEFAULT_NAME) -> int:
    print("== starting the lab (storage: nfs-ganesha + sshd, source: Debian with systemd, openqrm: openQRM 5.3.60)")
    info: dict[str, Any] = _lab.up(name)
    cfg = info["config"]
    for role, h in info["hosts"].items():
        print(f"   {role:<8} {h['address']}")
    target = f"storage:/exports/{IMAGE}"
    rc = _run("create", "create", "-s", IMAGE, "-t", target, "-l", "source:/", "-u", info["openqrm"]["user"],
              "--password-file", info["openqrm"]["password_file"], "-a", "x86_64", "--operation-system",
              "debian12", "--force", config=cfg)
    if rc != 0:
        print(f"demo: create failed (exit {rc})", file=sys.stderr)
        return rc
    _run("validate", "validate", "-t", target, config=cfg)
    _run("list", "list", config=cfg)
    oq = info["openqrm"]
    rec = _lab.openqrm_sql(name, f"SELECT * FROM image_info WHERE image_name='{IMAGE}' ORDER BY image_id")
    print(f"\n== what openQRM {oq['version']} holds for the image (SELECT * FROM image_info in its database; "
          f"its nfs-deployment id is {oq['nfs_deployment_id']}, the storage's id {oq['storage_ids']['storage']}):")
    print(json.dumps(rec[-1] if rec else None, indent=2))
    print(f"\nThe image is at {target} (NFS export {info['hosts']['storage']['address']}:/exports/{IMAGE}).")
    print(f"Boot it diskless in QEMU: .venv/bin/python -m lab boot -t {target}")
    print("Stop the lab: make lab-down")
    return 0
