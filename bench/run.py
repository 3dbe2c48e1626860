"""Benchmarks against the lab (not tests: they measure, they do not assert).

- create: wall time and throughput of `qrmfs create` of the whole lab source, and qrmfs's own peak memory;
- clone: `qrmfs clone` on the same storage server against a plain `rsync -aHAXS` and `cp -a` of the same
  image run directly on the storage server (the issue: clone should take about the time of a local copy);
- prepare: `qrmfs validate --fix` on a clean image (the preparation's cost without the copy).

Run: `make bench` (starts the lab). Prints a table and writes bench/results/latest.json.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab import lab as _lab  # noqa: E402

ROUNDS = int(os.environ.get("QRMFS_BENCH_ROUNDS", "3"))


def qrmfs(cfg: str, *args: str) -> tuple[float, int]:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "qrmfs", *args, "--config", cfg], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"qrmfs {' '.join(args)} failed: {r.stderr}")
    return time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss


def on_storage(info: dict, script: str) -> float:
    t = time.perf_counter()
    subprocess.run([*_lab.ssh_argv(info, "storage"), script], check=True, capture_output=True)
    return time.perf_counter() - t


def median(xs: list[float]) -> float:
    return sorted(xs)[len(xs) // 2]


def main() -> None:
    info = _lab.up()
    cfg = info["config"]
    res: dict[str, object] = {"rounds": ROUNDS}
    creates, clones, rsyncs, cps, fixes = [], [], [], [], []
    rss = 0
    for _ in range(ROUNDS):
        dt, rss = qrmfs(cfg, "create", "-t", "storage:/exports/bench_a", "-l", "source:/", "-o", "--force")
        creates.append(dt)
        on_storage(info, "rm -rf /exports/bench_b /exports/.bench_b.qrmfs-*")
        clones.append(qrmfs(cfg, "clone", "-s", "bench_b", "-t", "storage:/exports/bench_b", "--from",
                            "storage:/exports/bench_a", "-o")[0])
        rsyncs.append(on_storage(info, "rm -rf /exports/bench_r && rsync -aHAXS --numeric-ids /exports/bench_a/ "
                                       "/exports/bench_r/"))
        cps.append(on_storage(info, "rm -rf /exports/bench_c && cp -a /exports/bench_a /exports/bench_c"))
        fixes.append(qrmfs(cfg, "validate", "-t", "storage:/exports/bench_a", "--fix")[0])
    size = json.loads(subprocess.run([*_lab.ssh_argv(info, "storage"), "cat /exports/bench_a/.qrmfs/manifest.json"],
                                     capture_output=True, check=True).stdout)["counts"]
    on_storage(info, "rm -rf /exports/bench_[abrc] /exports/.bench_[abrc].qrmfs-*")
    mib = size["bytes"] / 2**20
    res.update({
        "image": {"files": size["files"], "MiB": round(mib, 1)},
        "create_s": round(median(creates), 2), "create_MiB_per_s": round(mib / median(creates), 1),
        "clone_s": round(median(clones), 2), "local_rsync_s": round(median(rsyncs), 2),
        "local_cp_s": round(median(cps), 2), "clone_over_local_rsync": round(median(clones) / median(rsyncs), 2),
        "validate_fix_s": round(median(fixes), 2), "qrmfs_peak_rss_MiB": round(rss / 1024, 1),
    })
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(res, indent=2) + "\n")
    for k, v in res.items():
        print(f"{k:<24} {v}")


if __name__ == "__main__":
    main()
