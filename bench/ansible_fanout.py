"""Issue 14's fan-out figure: the example playbook building images on two storage servers at once against
building on one alone, same source tree (the lab source's root), alternating pairs.

Each measurement is one `ansible-playbook` run of ansible/.../examples/playbook.yml with `image_state=present`
(preflight, create, validate) and a fresh image name; its wall time is measured, and so is each qrmfs build
(the image manifest's created..finished). The images are removed afterwards (`image_state=absent`, untimed).
The solo server alternates between `plain` (the first storage container) and `storage2` (the second).

Run: `QRMFS_LAB_NAME=perf .venv/bin/python bench/ansible_fanout.py [--pairs 3]` (starts `lab up --storages 2`).
Writes bench/results/ansible-fanout-YYYY-MM-DD-HHMM.json and prints the ratios.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lab import lab as _lab  # noqa: E402

PLAYBOOK = ROOT / "ansible" / "ansible_collections" / "qrmfs" / "qrmfs" / "examples" / "playbook.yml"
BIN = Path(sys.executable).parent
HOSTS = {"plain": ("storage", _lab.PLAIN_ROOT), "storage2": ("storage2", _lab.EXPORT_ROOT)}


def _play(info: dict[str, Any], work: Path, hosts: list[str], prefix: str, state: str) -> float:
    inv = work / f"inv-{prefix}.ini"
    inv.write_text("[qrmfs_storage]\n" + "".join(f"{h} export_root={HOSTS[h][1]}\n" for h in hosts))
    argv = [str(BIN / "ansible-playbook"), "-i", str(inv), "-f", "5", str(PLAYBOOK), "-e",
            f"qrmfs_config={info['config']}", "-e", "golden=source:/", "-e", f"qrmfs_bin={BIN / 'qrmfs'}",
            "-e", f"image_prefix={prefix}", "-e", f"image_state={state}"]
    env = {"PATH": f"{BIN}:/usr/bin:/bin", "HOME": str(work), "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "ansible"),
           "ANSIBLE_NOCOLOR": "1", "LANG": "C.UTF-8"}
    t = time.monotonic()
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=1800)
    took = time.monotonic() - t
    if r.returncode != 0:
        raise SystemExit(f"ansible-playbook failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-2000:]}")
    return took


def _build_seconds(info: dict[str, Any], host: str, prefix: str) -> float:
    role, root = HOSTS[host]
    r = subprocess.run([*_lab.ssh_argv(info, role), f"cat {root}/{prefix}_{host}/.qrmfs/manifest.json"],
                       capture_output=True, text=True, timeout=60, check=True)
    m = json.loads(r.stdout)
    t = [dt.datetime.fromisoformat(m[k].replace("Z", "+00:00")) for k in ("created", "finished")]
    return (t[1] - t[0]).total_seconds()


def measure(info: dict[str, Any], work: Path, hosts: list[str]) -> dict[str, Any]:
    prefix = "fan_" + uuid.uuid4().hex[:6]
    wall = _play(info, work, hosts, prefix, "present")
    builds = {h: _build_seconds(info, h, prefix) for h in hosts}
    _play(info, work, hosts, prefix, "absent")
    return {"hosts": hosts, "wall_s": round(wall, 2), "build_s": {h: round(s, 2) for h, s in builds.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=3)
    args = ap.parse_args()
    info = _lab.up(storages=2)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="qrmfs-fanout-") as tmp:
        work = Path(tmp)
        for i in range(args.pairs):
            solo = ["plain"] if i % 2 == 0 else ["storage2"]
            order = [solo, ["plain", "storage2"]] if i % 2 == 0 else [["plain", "storage2"], solo]
            pair = [measure(info, work, hosts) for hosts in order]
            ratio = next(r["wall_s"] for r in pair if len(r["hosts"]) == 2) / next(
                r["wall_s"] for r in pair if len(r["hosts"]) == 1)
            runs += [{**r, "pair": i} for r in pair]
            print(f"pair {i}: " + ", ".join(f"{'+'.join(r['hosts'])} {r['wall_s']:.1f}s (builds "
                                            + ", ".join(f"{s:.1f}" for s in r['build_s'].values()) + ")"
                                            for r in pair) + f"; two/one = {ratio:.2f}", flush=True)
    ratios = [sum(r["wall_s"] for r in runs if r["pair"] == i and len(r["hosts"]) == 2)
              / sum(r["wall_s"] for r in runs if r["pair"] == i and len(r["hosts"]) == 1) for i in range(args.pairs)]
    load = Path("/proc/loadavg").read_text().split()[:3]
    result = {"when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cores": len(os.sched_getaffinity(0)),
              "loadavg_end": load, "runs": runs, "ratios": [round(r, 2) for r in ratios],
              "median_ratio": round(statistics.median(ratios), 2)}
    out = ROOT / "bench" / "results" / f"ansible-fanout-{dt.datetime.now(dt.UTC):%Y-%m-%d-%H%M}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"two servers / one alone, wall time of the playbook: {result['ratios']} (median "
          f"{result['median_ratio']}); {out}")


if __name__ == "__main__":
    main()
