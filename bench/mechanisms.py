"""Issue 11's copy mechanisms, measured against each other in the lab (no qrmfs code involved).

For the lab source's root (with /srv/fixture and its 1 GiB sparse file) and the 100k tree, alternating,
a fresh target per run, nothing deleted until the end:
  (a) `rsync -aHAXS --numeric-ids` pulled by the storage server from the source over ssh;
  (b) the same with `--compress --compress-choice=zstd` and with `lz4`;
  (c) a `tar --sparse --xattrs --acls --numeric-owner` stream over ssh into an empty staging dir;
and for each, which fidelity cases of /srv/fixture it keeps (the e2e tests' tree description, compared
property by property with the source). Clone mechanisms (cp -a, cp -al, cp --reflink, local rsync) are
in run.py's clone job.

Run: `QRMFS_LAB_NAME=perf .venv/bin/python bench/mechanisms.py [--pairs 3] [--trees root t100k]`.
Writes bench/results/mechanisms-YYYY-MM-DD-HHMM.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import run as R

from tests.e2e.helpers import tree_info

FIXTURE = "/srv/fixture"


def mechanisms(b: R.Bench) -> dict[str, Any]:
    return {
        "rsync -aHAXS": lambda tree, dest, excl: b.rsync_pull(tree, dest, excl),
        "rsync -aHAXS zstd": lambda tree, dest, excl: b.rsync_pull(tree, dest, excl, "--compress",
                                                                   "--compress-choice=zstd"),
        "rsync -aHAXS lz4": lambda tree, dest, excl: b.rsync_pull(tree, dest, excl, "--compress",
                                                                  "--compress-choice=lz4"),
        "tar --sparse stream": lambda tree, dest, excl: b.tar_pull(tree, dest, excl),
    }


CASES = {  # fidelity case -> (fixture entries, properties that must match)
    "hard links": (["hardlinks/a", "hardlinks/b", "hardlinks/sub/c"], ["links"]),
    "ACLs (access, default)": (["acl-file", "acl-dir"], ["xattrs", "mode"]),
    "xattrs + security.capability": (["cap-file", "xattr-file"], ["xattrs"]),
    "devices": (["null-device", "block-device"], ["type", "rdev"]),
    "FIFO": (["fifo"], ["type"]),
    "socket": (["socket"], ["type"]),
    "numeric ids (foreign owner)": (["foreign-owner"], ["uid", "gid"]),
    "setuid/setgid/sticky": (["setuid", "setgid-dir", "sticky-dir"], ["mode"]),
    "foreign-owned dir, lchown'd symlink": (["foreign-dir", "link-relative"], ["uid", "gid"]),
    "non-UTF-8, space, newline names": (["names/bad-\\xff\\xfe-bytes", "names/with space", "names/with\nnewline"],
                                        ["type", "sha256"]),
    "sparse file (holes kept)": (["sparse"], ["size", "sparse", "sha256"]),
    "symlinks": (["link-absolute", "link-relative", "link-dangling", "link-dir"], ["target"]),
    "mtimes": (["hardlinks/a", "acl-file", "sparse", "setuid"], ["mtime"]),
}


def fidelity(src: dict[str, Any], img: dict[str, Any]) -> dict[str, str]:
    out = {}
    for case, (entries, props) in CASES.items():
        present = [e for e in entries if e in src]
        if not present:
            out[case] = "not in fixture"
            continue
        bad = [f"{e}: {p}" for e in present for p in props
               if e not in img or src[e].get(p) != img[e].get(p)]
        out[case] = "kept" if not bad else "LOST (" + "; ".join(bad[:3]) + ")"
    diff_all = sorted(k for k in set(src) | set(img) if src.get(k) != img.get(k))
    out["all entries equal"] = "yes" if not diff_all else f"no: {', '.join(diff_all[:6])}"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--trees", nargs="*", default=["root", "t100k"])
    args = ap.parse_args()
    name = os.environ.get("QRMFS_LAB_NAME") or "bench"
    if name == "qrmfs-lab":
        raise SystemExit("mechanisms: refusing the default lab `qrmfs-lab`; set QRMFS_LAB_NAME")
    started = dt.datetime.now(dt.UTC)
    info = R._lab.up(name)
    lab = R.Lab(info)
    lab.storage_pid = lab.find_storage_pid()
    bargs = argparse.Namespace(quick=False, huge=False, pairs=args.pairs, trees=args.trees)
    b = R.Bench(lab, bargs)
    b.prefix = f"bench_mech_{b.tag}"
    out: dict[str, Any] = {"started": started.isoformat(), "machine": R.machine(), "timing": [], "fidelity": {}}
    with R.ssh_agent(lab):
        try:
            b.setup()
            mech = mechanisms(b)
            for t in args.trees:
                path, _, excl = b.tree_source(t)
                contenders = []
                for m, f in mech.items():
                    def make(i: int, f: Any = f, path: str = path, excl: list[str] = excl
                             ) -> tuple[list[str], str, tuple[int, ...]]:
                        target = b.fresh("/exports", "m")
                        return f(path, target, excl), target, (0, 24)
                    contenders.append((m, make))
                b.pairs("copy", t, contenders)
            src = tree_info(info, "source", FIXTURE)
            for m, f in mech.items():
                target = b.fresh("/exports", "fid")
                R.subprocess.run(f(FIXTURE, target, []), check=True, capture_output=True, env=lab.env)
                out["fidelity"][m] = fidelity(src, tree_info(info, "storage", target))
        finally:
            b.cleanup()
    out["timing"] = R.summarize(b.results)
    out["runs"] = b.results
    R.RESULTS.mkdir(exist_ok=True)
    report = R.RESULTS / f"mechanisms-{started.strftime('%Y-%m-%d-%H%M')}.json"
    report.write_text(json.dumps(out, indent=1) + "\n")
    print("| tree | mechanism | median s | min-max s | wire MiB | rsync literal MiB | alloc MiB |")
    print("|---|---|---|---|---|---|---|")
    for r in out["timing"]:
        print(f"| {r['tree']} | {r['contender']} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | "
              f"{r['wire_MiB']} | {r['rsync_literal_MiB'] or ''} | {r['allocated_MiB']} |")
    cases = list(next(iter(out["fidelity"].values())))
    print("\n| case | " + " | ".join(out["fidelity"]) + " |")
    print("|---|" + "---|" * len(out["fidelity"]))
    for c in cases:
        print(f"| {c} | " + " | ".join(shlex.quote(v) if "\n" in v else v for v in
                                      (out["fidelity"][m][c] for m in out["fidelity"])) + " |")
    print(f"\nwrote {report}")


if __name__ == "__main__":
    main()
