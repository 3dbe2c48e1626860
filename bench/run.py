"""`make bench`: where qrmfs's performance numbers come from (issue 11). It measures, it does not assert.

- Its own lab: `$QRMFS_LAB_NAME`, default `bench`; it refuses the default lab `qrmfs-lab`, which belongs
  to someone else. `/exports` is the lab's XFS export (reflinks), `/exports-plain` the ext4 volume.
- Its own trees, built once on the source host under /mnt/bench (kept between runs, rebuilt when their recipe
  changes): 5 files; 1k and 10k files of 1-4 KiB; 100k files of 1-4 KiB plus 5 x 50 MB; 1M behind --huge.
  And the lab source's root (`/`; qrmfs leaves out the contents of /mnt), with and without /srv/fixture
  (which holds the 1 GiB sparse file).
- Per job, qrmfs (through its CLI, `--json`) and each anchor alternate, the order rotating each pair:
  create vs a plain `rsync -aHAXS` pull and a `tar --sparse` stream by the same route (run on the storage
  server, pulling from the source over ssh with a forwarded agent, the excludes qrmfs itself uses);
  update (`qrmfs update`: of an unchanged source vs an rsync no-change pass, and, on the generated trees,
  after 1% of the files changed vs the rsync pass that copies them; the space column is the disk each
  generation costs on XFS); a registered create of 5 files (the fixed overhead, with openQRM); clone (on /exports and on
  /exports-plain) vs `cp -a`, `cp -al`, `cp -a --reflink=always|never` (XFS, where coreutils 9's plain
  `cp -a` already reflinks) and a local rsync; `validate -l` vs an rsync dry run; `validate` vs a `find`
  walk. Every run is timed end to end from this machine.
- A fresh target for every run, and no delete during the bench: every copy is removed at the end, so
  ext4's inode-reuse delay after a big delete never lands in a timed run. (Leftovers of a crashed bench
  are removed at the start, which says so: on ext4, rerun a minute later for clean numbers.)
- Per run: wall time; bytes on the wire (the storage container's eth0 counters, read from the host's
  /proc/<pid>/net/dev, plus rsync's own --stats where it prints them); bytes allocated (`du`, first pair);
  space taken on the XFS export (statvfs after syncfs, from the host); qrmfs's peak RSS (wait4); the storage-side
  processes' peak RSS (VmHWM, sampled from the storage container's cgroup).
- Medians, spread (min-max), ratios qrmfs / anchor, into bench/results/YYYY-MM-DD-HHMM-{quick,full}.md
  and .json.

Run: `make bench`, `make bench ARGS=--quick` or `.venv/bin/python bench/run.py --quick` (9.5 minutes on a
2-core machine under a load of 7-9, 2 of them removing the copies).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lab import lab as _lab  # noqa: E402
from qrmfs.agent.protocol import SPARE_DEFAULT, SPARE_POLICIES  # noqa: E402

QRMFS = str(REPO / ".venv" / "bin" / "qrmfs")
PYTHON = str(REPO / ".venv" / "bin" / "python")
RESULTS = Path(__file__).resolve().parent / "results"
TREE_ROOT = "/mnt/bench"  # qrmfs never copies the contents of /mnt of a root: the root job skips them
MiB = 2**20

# What make_tree.py builds on the source: name -> (small files, big files of 50 MB). Bump VERSION when the
# generator changes, and the trees are rebuilt.
TREES_VERSION = "1"
ORDER = ["root", "root-nosparse", "t5", "t1k", "t10k", "t100k", "t1m"]
GENERATED = {"t5": (5, 0), "t1k": (1_000, 0), "t10k": (10_000, 0), "t100k": (100_000, 5), "t1m": (1_000_000, 0)}

MAKE_TREE = r'''
import os, random, shutil, sys
root, n_small, n_big, version = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
marker = os.path.join(root, ".bench-tree")
if os.path.exists(marker) and open(marker).read() == version:
    sys.exit(0)
shutil.rmtree(root, ignore_errors=True)  # an older recipe's tree
rnd = random.Random(11)
words = [("%x" % rnd.getrandbits(40)).encode() for _ in range(4096)]
for i in range(n_small):
    d = os.path.join(root, "d%04d" % (i // 100))
    if i % 100 == 0:
        os.makedirs(d, exist_ok=True)
    size = rnd.randint(1024, 4096)
    # half text-like (compressible), half random bytes
    data = (b" ".join(rnd.choices(words, k=size // 8)) if i % 2 else rnd.randbytes(size))[:size]
    with open(os.path.join(d, "f%06d" % i), "wb") as f:
        f.write(data)
os.makedirs(os.path.join(root, "big"), exist_ok=True)
for i in range(n_big):
    with open(os.path.join(root, "big", "b%d" % i), "wb") as f:
        for _ in range(50):
            f.write(os.urandom(10**6))
with open(marker, "w") as f:
    f.write(version)
'''

# Rewrites every 100th small file (those whose number is k modulo 100) with new bytes of the same size.
CHANGE_TREE = r'''
import os, sys
root, k = sys.argv[1], int(sys.argv[2])
for d in sorted(os.listdir(root)):
    if not d.startswith("d"):
        continue
    for f in os.listdir(os.path.join(root, d)):
        if f.startswith("f") and int(f[1:]) % 100 == k:
            p = os.path.join(root, d, f)
            data = os.urandom(os.path.getsize(p))
            with open(p + ".new", "wb") as out:
                out.write(data)
            os.rename(p + ".new", p)
'''


# ---------------------------------------------------------------- the lab ---------------------------------
@dataclass
class Lab:
    info: dict[str, Any]
    agent_sock: str = ""
    agent_pid: int = 0
    storage_pid: int = 0  # the storage container's init, whose /proc/<pid>/net/dev is its eth0

    def ssh(self, role: str, script: str, *, forward: bool = False) -> list[str]:
        argv = _lab.ssh_argv(self.info, role)
        return [argv[0], "-A", *argv[1:], script] if forward else [*argv, script]

    def run(self, role: str, script: str, check: bool = True, timeout: float = 3600) -> str:
        r = subprocess.run(self.ssh(role, script), capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise SystemExit(f"bench: on {role}: {script[:200]!r} exited {r.returncode}: {r.stderr[-500:]}")
        return r.stdout

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SSH_AUTH_SOCK": self.agent_sock}

    @property
    def source_addr(self) -> str:
        return str(self.info["hosts"]["source"]["address"])

    def find_storage_pid(self) -> int:
        return int(subprocess.run(["docker", "inspect", "-f", "{{.State.Pid}}", self.info["hosts"]["storage"]
                                   ["container_id"]], capture_output=True, text=True, check=True).stdout)


@contextmanager
def ssh_agent(lab: Lab) -> Iterator[None]:
    """A private ssh-agent with the lab key, forwarded to the storage server for the anchors' pulls."""
    d = tempfile.mkdtemp(prefix="qrmfs-bench-")
    sock = os.path.join(d, "agent.sock")
    p = subprocess.Popen(["ssh-agent", "-D", "-a", sock], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(sock):
            if time.monotonic() > deadline:
                raise SystemExit("bench: ssh-agent did not start")
            time.sleep(0.05)
        lab.agent_sock, lab.agent_pid = sock, p.pid
        subprocess.run(["ssh-add", "-q", lab.info["ssh"]["private_key"]], env=lab.env, check=True)
        yield
    finally:
        p.terminate()
        p.wait()


def net_bytes(pid: int) -> int:
    """Bytes received plus sent on the storage container's eth0 (its network namespace, read from the host)."""
    for line in Path(f"/proc/{pid}/net/dev").read_text().splitlines():
        if line.strip().startswith("eth0:"):
            f = line.split(":", 1)[1].split()
            return int(f[0]) + int(f[8])
    raise SystemExit("bench: no eth0 in the storage container")


class HwmSampler:
    """Peak VmHWM of the storage container's processes other than its daemons, sampled every 50 ms."""

    DAEMONS = {"ganesha.nfsd", "sshd", "rpcbind", "dbus-daemon", "bash", "lab-entrypoint", "runc:[2:INIT]"}

    def __init__(self, container_pid: int) -> None:
        self.procs: Path | None = None
        for line in Path(f"/proc/{container_pid}/cgroup").read_text().splitlines():
            rel = line.split(":", 2)[2].lstrip("/")
            for base in ("/sys/fs/cgroup", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/unified", "/sys/fs/cgroup/memory"):
                if rel and (Path(base) / rel / "cgroup.procs").exists():
                    self.procs = Path(base) / rel / "cgroup.procs"
                    break
            if self.procs:
                break
        self.peak: dict[str, int] = {}
        self._stop = threading.Event()
        self._t: threading.Thread | None = None

    def _loop(self) -> None:
        assert self.procs is not None
        while not self._stop.wait(0.05):
            try:
                pids = self.procs.read_text().split()
            except OSError:
                continue
            for pid in pids:
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                kv = dict(ln.split(":", 1) for ln in status.splitlines() if ":" in ln)
                name = kv.get("Name", "").strip()
                if name in self.DAEMONS or "VmHWM" not in kv:
                    continue
                kib = int(kv["VmHWM"].split()[0])
                self.peak[name] = max(self.peak.get(name, 0), kib)

    def __enter__(self) -> HwmSampler:
        self.peak = {}
        if self.procs is not None:
            self._stop.clear()
            self._t = threading.Thread(target=self._loop, daemon=True)
            self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._t is not None:
            self._stop.set()
            self._t.join()


# ---------------------------------------------------------------- runs -------------------------------------
@dataclass
class Run:
    contender: str
    seconds: float
    wire_bytes: int
    rc: int
    rss_kib: int = 0  # peak RSS of the local process tree (qrmfs only)
    storage_hwm_kib: dict[str, int] = field(default_factory=dict)
    rsync_stats: dict[str, int] = field(default_factory=dict)
    allocated: int | None = None
    apparent: int | None = None
    space_delta: int | None = None
    target: str = ""


def timed(lab: Lab, argv: list[str], ok: tuple[int, ...] = (0,), env: dict[str, str] | None = None
          ) -> tuple[float, int, str, str, int, int, dict[str, int]]:
    """Run argv, timed end to end. Returns seconds, rc, stdout, stderr, wire bytes, peak RSS, storage HWM."""
    pid = lab.storage_pid
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err, HwmSampler(pid) as hwm:
        n0 = net_bytes(pid)
        t0 = time.perf_counter()
        p = subprocess.Popen(argv, stdout=out, stderr=err, env=env or lab.env)
        _, status, ru = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        wire = net_bytes(pid) - n0
        out.seek(0)
        err.seek(0)
        so, se = out.read().decode(errors="replace"), err.read().decode(errors="replace")
    if p.returncode not in ok:
        raise SystemExit(f"bench: `{shlex.join(argv)[:300]}` exited {p.returncode}:\n{se[-1500:]}")
    return seconds, p.returncode, so, se, wire, ru.ru_maxrss, dict(hwm.peak)


def parse_rsync_stats(text: str) -> dict[str, int]:
    keys = {"Total bytes sent": "sent", "Total bytes received": "received", "Literal data": "literal",
            "Total file size": "file_size", "Number of files": "files"}
    out: dict[str, int] = {}
    for line in text.splitlines():
        k, _, v = line.partition(":")
        if k.strip() in keys and v.strip():
            out[keys[k.strip()]] = int(v.strip().split()[0].replace(",", ""))
    return out


def result_of(stdout: str) -> dict[str, Any]:
    """qrmfs --json: the envelope's `result` when there is one, else the top level."""
    try:
        d = json.loads(stdout)
    except json.JSONDecodeError:
        return {}
    return d.get("result", d) if isinstance(d, dict) else {}


# ---------------------------------------------------------------- the bench --------------------------------
# One contender's run i: (argv, the target it writes or "", the exit codes that count as success).
Maker = Callable[[int], tuple[list[str], str, tuple[int, ...]]]


class Bench:
    def __init__(self, lab: Lab, args: argparse.Namespace) -> None:
        self.lab, self.args = lab, args
        self.cfg = lab.info["config"]
        if args.spare:  # qrmfs's `spare` setting for this run: the lab's config with it on top
            cfg = Path(self.cfg).with_name(f"qrmfs-spare-{args.spare}.toml")
            cfg.write_text(f'spare = "{args.spare}"\n' + Path(self.cfg).read_text())
            self.cfg = str(cfg)
        self.tag = dt.datetime.now(dt.UTC).strftime("%H%M%S")
        self.prefix = f"bench_{self.tag}"
        self.n = 0
        self.results: list[dict[str, Any]] = []
        self.kh = "/root/.bench/known_hosts"
        self.rsh = shlex.join(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o",
                               f"UserKnownHostsFile={self.kh}", "-l", "root"])
        self.excludes: list[str] = []
        self.changes = 0
        self.export_fs = lab.info["hosts"]["storage"].get("exports", {"/exports": "?"})
        self.xfs_mnt = _lab.exports.mount_point(_lab.LabHandle(lab.info["name"]).state) \
            if self.export_fs.get("/exports") == "xfs" else None

    # -- names
    def fresh(self, root: str, what: str) -> str:
        self.n += 1
        return f"{root}/{self.prefix}_{what}_{self.n}"

    # -- qrmfs and anchors as argv
    def qrmfs(self, *args: str) -> list[str]:
        return [QRMFS, *args, "--json", "--config", self.cfg]

    def on_storage(self, script: str) -> list[str]:
        return self.lab.ssh("storage", script, forward=True)

    def src(self, tree: str) -> str:
        return f"{self.lab.source_addr}:{tree.rstrip('/')}/"

    def rsync_pull(self, tree: str, dest: str, excl: list[str], *extra: str) -> list[str]:
        argv = ["rsync", "-aHAXS", "--numeric-ids", "--one-file-system", "--stats", *extra,
                *[f"--exclude={e}" for e in excl], "-e", self.rsh, self.src(tree), dest + "/"]
        return self.on_storage(shlex.join(argv))

    def tar_pull(self, tree: str, dest: str, excl: list[str]) -> list[str]:
        fid = ["--xattrs", "--xattrs-include=*", "--acls", "--numeric-owner"]
        create = ["tar", "--sparse", *fid, "--one-file-system", "-C", tree,
                  *[f"--exclude=.{e}" for e in excl], "-cf", "-", "."]
        remote = shlex.join(["ssh", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o",
                             f"UserKnownHostsFile={self.kh}", "-l", "root", self.lab.source_addr, shlex.join(create)])
        script = (f"mkdir {shlex.quote(dest)} && {remote} | "
                  + shlex.join(["tar", "-x", *fid, "-p", "--same-owner", "-C", dest, "-f", "-"]))
        return self.on_storage(script)

    # -- measuring
    def xfs_free(self) -> os.statvfs_result | None:
        """The XFS export's free blocks once its delayed allocations are on disk (syncfs, untimed)."""
        if not self.xfs_mnt:
            return None
        subprocess.run(["sync", "-f", str(self.xfs_mnt)], check=True)
        return os.statvfs(self.xfs_mnt)

    def measure(self, contender: str, argv: list[str], target: str = "", ok: tuple[int, ...] = (0,),
                allocated: bool = False) -> Run:
        free0 = self.xfs_free() if target.startswith("/exports/") else None
        s, rc, so, se, wire, rss, hwm = timed(self.lab, argv, ok)
        run = Run(contender, s, wire, rc, rss_kib=rss, storage_hwm_kib=hwm, target=target)
        run.rsync_stats = parse_rsync_stats(so)
        if free0 is not None and self.xfs_mnt:
            f1 = self.xfs_free()
            assert f1 is not None
            run.space_delta = (free0.f_bfree - f1.f_bfree) * f1.f_frsize
        if allocated and target:
            out = self.lab.run("storage", f"du -sB1 {shlex.quote(target)}; du -sB1 --apparent-size "
                                          f"{shlex.quote(target)}").split()
            run.allocated, run.apparent = int(out[0]), int(out[2])
        print(f"  {contender:<22} {s:7.2f}s  wire {wire / MiB:8.1f} MiB  rc {rc}", flush=True)
        return run

    def pairs(self, job: str, tree: str, contenders: Sequence[tuple[str, Maker]], note: str = ""
              ) -> dict[str, list[Run]]:
        """Run each contender once per pair, the order rotating each pair. Each factory gives argv, target, ok."""
        print(f"{job} {tree}{' (' + note + ')' if note else ''}", flush=True)
        runs: dict[str, list[Run]] = {c: [] for c, _ in contenders}
        for i in range(self.args.pairs):
            k = i % len(contenders)
            order = [*contenders[k:], *contenders[:k]]
            for name, make in order:
                argv, target, ok = make(i)
                runs[name].append(self.measure(name, argv, target, ok, allocated=(i == 0)))
        self.results.append({"job": job, "tree": tree, "note": note,
                             "runs": {c: [r.__dict__ for r in rs] for c, rs in runs.items()}})
        return runs

    # -- setup
    def setup(self) -> None:
        lab = self.lab
        lab.run("storage", "mkdir -p /root/.bench && cat > /root/.bench/known_hosts <<'EOF'\n"
                + Path(lab.info["ssh"]["known_hosts"]).read_text() + "EOF")
        left = lab.run("storage", "ls -d /exports/bench_* /exports/.bench_* /exports-plain/bench_* "
                                  "/exports-plain/.bench_* 2>/dev/null || true").split()
        if left:
            print(f"bench: removing {len(left)} leftovers of an earlier bench (before the trees are built)")
            lab.run("storage", "rm -rf " + " ".join(shlex.quote(p) for p in left))
        dry = result_of(subprocess.run(self.qrmfs("create", "-t", "storage:/exports/bench_dry", "-l", "source:/",
                                                  "-o", "--dry-run"), capture_output=True, text=True).stdout)
        first = dry["copies"][0]  # an rsync, or a tar stream with its rsync repair (the same excludes)
        argv = first.get("repair_if_unclean") or first["argv"]
        self.excludes = [a.split("=", 1)[1] for a in argv if a.startswith("--exclude=")]
        for t in self.trees():
            if t in GENERATED:
                small, big = GENERATED[t]
                t0 = time.perf_counter()
                r = subprocess.run(self.lab.ssh("source", shlex.join(["python3", "-c", MAKE_TREE, f"{TREE_ROOT}/{t}",
                                                                      str(small), str(big), TREES_VERSION])),
                                   capture_output=True, text=True)
                if r.returncode != 0:
                    raise SystemExit(f"bench: building tree {t} failed: {r.stderr[-800:]}")
                print(f"bench: tree {t} ready ({time.perf_counter() - t0:.1f}s)", flush=True)

    def trees(self) -> list[str]:
        """The trees, small ones first whatever order --trees names them in: a job runs beside what the earlier
        ones left on the export until the end (the anchors' plain copies), and the openQRM name check of a
        registered create lists the export three levels down (0.9 s more beside ten 100k-file copies)."""
        if self.args.trees:
            return sorted(self.args.trees, key=lambda t: ORDER.index(t) if t in ORDER else len(ORDER))
        if self.args.quick:
            return ["root", "t5", "t1k"]
        return ORDER[:-1] + (["t1m"] if self.args.huge else [])

    def tree_source(self, t: str) -> tuple[str, list[str], list[str]]:
        """(path on the source, qrmfs -e options, anchor excludes) for a tree."""
        if t == "root":
            return "/", [], list(self.excludes)
        if t == "root-nosparse":
            return "/", ["-e", "/srv/fixture"], [*self.excludes, "/srv/fixture/*"]
        return f"{TREE_ROOT}/{t}", [], list(self.excludes)

    # -- jobs
    def create_jobs(self, t: str) -> dict[str, Any]:
        path, e_opts, excl = self.tree_source(t)
        made: dict[str, str] = {}

        def q(i: int) -> tuple[list[str], str, tuple[int, ...]]:
            target = self.fresh("/exports", f"q{t.replace('-', '')}")
            made.setdefault("qrmfs", target)
            return self.qrmfs("create", "-t", f"storage:{target}", "-l", f"source:{path}", "-o", *e_opts), target, (0,)

        def r(i: int) -> tuple[list[str], str, tuple[int, ...]]:
            target = self.fresh("/exports", "rsync")
            made.setdefault("rsync", target)
            return self.rsync_pull(path, target, excl), target, (0, 24)

        def tar(i: int) -> tuple[list[str], str, tuple[int, ...]]:
            target = self.fresh("/exports", "tar")
            return self.tar_pull(path, target, excl), target, (0,)

        def registered(i: int) -> tuple[list[str], str, tuple[int, ...]]:
            target = self.fresh("/exports", f"qr{t}")
            return self.qrmfs("create", "-t", f"storage:{target}", "-l", f"source:{path}", *e_opts), target, (0,)

        contenders = [("qrmfs create", q), ("rsync pull", r), ("tar --sparse stream", tar)]
        if t == "t5":  # the fixed overhead: end to end with openQRM registration too, against one ssh round trip
            contenders += [("qrmfs create, registered", registered),
                           ("ssh storage true", lambda i: (self.on_storage("true"), "", (0,)))]
        self.pairs("create", t, contenders)
        return made

    def update_jobs(self, t: str, made: dict[str, str]) -> None:
        """`qrmfs update` (a new generation: the image reflinked into staging, rsync --delete, preparation,
        journaled swap) against rsync's pass over the anchor's copy, of an unchanged source and, for the
        generated trees, after 1% of the files changed (changed before each run, untimed: each contender
        pulls its own fresh 1%). The space column is what the XFS export lost per generation.

        The timed updates are an image's daily ones: two untimed updates first give it what it has from its
        second update on (a generation, and on XFS the spare the next update starts from, see
        docs/updating.md); the first update after a create, which copies the whole image, is timed once
        on its own ("update (first after create)")."""
        path, _e_opts, excl = self.tree_source(t)

        def q(i: int) -> tuple[list[str], str, tuple[int, ...]]:
            return self.qrmfs("update", "-t", f"storage:{made['qrmfs']}", "-o"), made["qrmfs"], (0,)

        print(f"update (first after create) {t}", flush=True)
        first = self.measure("qrmfs update", q(0)[0], made["qrmfs"])
        self.results.append({"job": "update (first after create)", "tree": t, "note": "one run",
                             "runs": {"qrmfs update": [first.__dict__]}})
        timed(self.lab, q(0)[0])  # the second, untimed: it prunes the first generation (the spare, on XFS)

        def r(i: int) -> tuple[list[str], str, tuple[int, ...]]:
            return self.rsync_pull(path, made["rsync"], excl, "--delete"), made["rsync"], (0, 24)

        self.pairs("update (unchanged source)", t, [("qrmfs update", q), ("rsync no-change pass", r)])
        if t not in GENERATED:
            return

        def changed(make: Maker) -> Maker:
            def run(i: int) -> tuple[list[str], str, tuple[int, ...]]:
                self.change_one_percent(t)
                return make(i)
            return run
        self.pairs("update (1% of files changed)", t, [("qrmfs update", changed(q)),
                                                       ("rsync pass copying them", changed(r))])

    def change_one_percent(self, t: str) -> None:
        """Rewrite every 100th small file of a generated tree (a new offset each time), untimed."""
        self.changes += 1
        self.lab.run("source", shlex.join(["python3", "-c", CHANGE_TREE, f"{TREE_ROOT}/{t}", str(self.changes % 100)]))

    def validate_jobs(self, t: str, made: dict[str, str]) -> None:
        path, e_opts, excl = self.tree_source(t)
        img = made["qrmfs"]
        self.pairs("validate -l (drift)", t, [
            ("qrmfs validate -l", lambda i: (self.qrmfs("validate", "-t", f"storage:{img}", "-l", f"source:{path}"),
                                             "", (0, 12))),
            ("rsync dry run", lambda i: (self.rsync_pull(path, made["rsync"], excl, "-n", "--delete",
                                                         "--itemize-changes"), "", (0, 24))),
        ])
        self.pairs("validate", t, [
            ("qrmfs validate", lambda i: (self.qrmfs("validate", "-t", f"storage:{img}"), "", (0, 12))),
            ("find walk", lambda i: (self.on_storage(f"find {shlex.quote(img)} | wc -l"), "", (0,))),
        ])

    def clone_jobs(self, t: str, made: dict[str, str]) -> None:
        path, e_opts, _ = self.tree_source(t)
        for root, storage in (("/exports", "storage"), ("/exports-plain", "plain")):
            fs = self.export_fs.get(root, "?")
            src = made["qrmfs"]
            if root != "/exports":  # an image on this export to clone from (made untimed)
                src = self.fresh(root, f"q{t.replace('-', '')}")
                subprocess.run(self.qrmfs("create", "-t", f"{storage}:{src}", "-l", f"source:{path}", "-o", *e_opts),
                               check=True, capture_output=True)
            name = src.rsplit("/", 1)[1]

            def qc(i: int, root: str = root, storage: str = storage, name: str = name
                   ) -> tuple[list[str], str, tuple[int, ...]]:
                target = self.fresh(root, "qclone")
                return (self.qrmfs("clone", "-s", target.rsplit("/", 1)[1], "-t", f"{storage}:{target}",
                                   "--from", f"{storage}:{root}/{name}", "-o"), target, (0,))

            def local(cmd: list[str], what: str, root: str = root, src: str = src
                      ) -> Callable[[int], tuple[list[str], str, tuple[int, ...]]]:
                def make(i: int) -> tuple[list[str], str, tuple[int, ...]]:
                    target = self.fresh(root, what)
                    return self.on_storage(shlex.join([*cmd, src + ("/" if cmd[0] == "rsync" else ""),
                                                       target + ("/" if cmd[0] == "rsync" else "")])), target, (0,)
                return make

            contenders = [("qrmfs clone", qc), ("cp -a", local(["cp", "-a"], "cpa")),
                          ("cp -al", local(["cp", "-al"], "cpal")),
                          ("rsync local", local(["rsync", "-aHAXS", "--numeric-ids"], "rsl"))]
            if fs in ("xfs", "btrfs"):
                # coreutils >= 9 defaults to --reflink=auto: plain `cp -a` shares blocks here too
                contenders.append(("cp -a --reflink=always", local(["cp", "-a", "--reflink=always"], "cpr")))
                contenders.append(("cp -a --reflink=never", local(["cp", "-a", "--reflink=never"], "cpn")))
            self.pairs("clone (same server)", t, contenders, note=f"{root} on {fs}")

    def wants(self, job: str) -> bool:
        return not self.args.jobs or job in self.args.jobs

    def run(self) -> None:
        self.setup()
        for t in self.trees():
            made = self.create_jobs(t)  # always: the other jobs start from its copies
            if t == "t1m":
                if self.wants("validate"):
                    self.validate_jobs(t, made)
                continue
            if t in ("root", "t100k", "t10k", "t1k") or not self.args.quick:
                if self.wants("update"):
                    self.update_jobs(t, made)
                if self.wants("validate"):
                    self.validate_jobs(t, made)
            if (t in ("root", "t100k") or (t in ("t1k", "t10k") and not self.args.quick)) and self.wants("clone"):
                self.clone_jobs(t, made)

    def cleanup(self) -> None:
        t0 = time.perf_counter()
        self.lab.run("storage", f"rm -rf /exports/{self.prefix}_* /exports/.{self.prefix}_* "
                                f"/exports-plain/{self.prefix}_* /exports-plain/.{self.prefix}_*", check=False)
        print(f"bench: removed this bench's copies ({time.perf_counter() - t0:.1f}s)")


# ---------------------------------------------------------------- the report -------------------------------
def summarize(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for res in results:
        q_name = next(iter(res["runs"]))
        q_med = statistics.median(r["seconds"] for r in res["runs"][q_name])
        for c, runs in res["runs"].items():
            secs = [r["seconds"] for r in runs]
            med = statistics.median(secs)
            first = runs[0]
            row = {"job": res["job"], "tree": res["tree"], "note": res["note"], "contender": c, "n": len(secs),
                   "median_s": round(med, 3), "min_s": round(min(secs), 3), "max_s": round(max(secs), 3),
                   "qrmfs_over_this": round(q_med / med, 2) if c != q_name and med > 0 else None,
                   "wire_MiB": round(statistics.median(r["wire_bytes"] for r in runs) / MiB, 1),
                   "allocated_MiB": round(first["allocated"] / MiB, 1) if first.get("allocated") is not None else None,
                   "apparent_MiB": round(first["apparent"] / MiB, 1) if first.get("apparent") is not None else None,
                   "space_delta_MiB": (round(statistics.median(r["space_delta"] for r in runs) / MiB, 1)
                                       if all(r.get("space_delta") is not None for r in runs) else None),
                   "rsync_literal_MiB": (round(first["rsync_stats"]["literal"] / MiB, 1)
                                         if "literal" in first.get("rsync_stats", {}) else None),
                   "peak_rss_MiB": round(max(r["rss_kib"] for r in runs) / 1024, 1),
                   "storage_peak_MiB": {k: round(v / 1024, 1) for k, v in _merge_max(
                       [r["storage_hwm_kib"] for r in runs]).items()}}
            if row["allocated_MiB"]:
                row["alloc_MiB_per_s"] = round(row["allocated_MiB"] / med, 1)
                row["wire_MiB_per_s"] = round(row["wire_MiB"] / med, 1)
            rows.append(row)
    return rows


def _merge_max(ds: list[dict[str, int]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for d in ds:
        for k, v in d.items():
            out[k] = max(out.get(k, 0), v)
    return dict(sorted(out.items(), key=lambda kv: -kv[1])[:3])


def compile_qrmfs() -> str:
    """Write the bytecode of the qrmfs the bench runs (the package its `qrmfs` imports, under this environment),
    as `pip install` does for an installed one. A checkout has none, or stale ones for the modules changed since,
    and where PYTHONDONTWRITEBYTECODE is set (it is on this machine) every qrmfs run would compile each of them
    again: 45-60 ms of each run's start-up that an installed qrmfs does not pay. Returns the package's path."""
    code = ("import compileall, os, qrmfs; d = os.path.dirname(qrmfs.__file__); "
            "print(d) if compileall.compile_dir(d, quiet=1) else exit(1)")
    r = subprocess.run([PYTHON, "-c", code], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"bench: compiling qrmfs's bytecode failed: {(r.stderr or r.stdout)[-800:]}")
    return r.stdout.strip()


def machine() -> dict[str, Any]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")
    mem = next((ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), "0")
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return {"host": platform.node(), "kernel": platform.release(), "cpu": cpu, "cores": os.cpu_count(),
            "mem_GiB": round(int(mem) / 2**20, 1), "commit": commit, "python": platform.python_version()}


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    m = meta["machine"]
    out = [f"# qrmfs bench, {meta['started']} ({meta['mode']})", "",
           f"Machine: {m['host']}, {m['cpu']}, {m['cores']} cores, {m['mem_GiB']} GiB, kernel {m['kernel']}; "
           f"qrmfs commit {m['commit']}. Lab `{meta['lab']}`, exports {meta['exports']}. "
           f"{meta['pairs']} alternating pairs per job, the order rotating; load average "
           f"{meta['load_before']} before, {meta['load_after']} after (other work on this machine shares the "
           f"cores). Took {meta['seconds']:.0f} s. qrmfs from {meta.get('qrmfs_package', '?')}, its bytecode "
           f"written first, as an installed qrmfs has it; `spare = {meta.get('spare', '?')}`.", "",
           "Times are medians, end to end from this machine (anchors run over one ssh to the storage server; "
           "`ssh storage true` is that cost). `qrmfs/x` is qrmfs's median over this row's. Wire: bytes in and "
           "out of the storage container's eth0 during the run (data plus qrmfs's agent traffic). Allocated: "
           "`du` of the result (first pair); space: blocks the XFS export lost (reflinks share blocks, `du` "
           "does not know).", "",
           "| job | tree | contender | median s | min-max s | qrmfs/x | wire MiB | alloc MiB | space MiB | "
           "MiB/s (alloc, wire) | peak RSS MiB (local; storage) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        job = r["job"] + (f" ({r['note']})" if r["note"] else "")
        storage_rss = ", ".join(f"{k} {v}" for k, v in r["storage_peak_MiB"].items())
        local = r["peak_rss_MiB"] if r["contender"].startswith("qrmfs") else "-"
        rate = f"{r['alloc_MiB_per_s']}, {r['wire_MiB_per_s']}" if "alloc_MiB_per_s" in r else ""
        out.append(f"| {job} | {r['tree']} | {r['contender']} | {r['median_s']:.2f} | {r['min_s']:.2f}-"
                   f"{r['max_s']:.2f} | {r['qrmfs_over_this'] if r['qrmfs_over_this'] is not None else ''} | "
                   f"{r['wire_MiB']} | {r['allocated_MiB'] if r['allocated_MiB'] is not None else ''} | "
                   f"{r['space_delta_MiB'] if r['space_delta_MiB'] is not None else ''} | "
                   f"{rate} | "
                   f"{local}; {storage_rss or '-'} |")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--quick", action="store_true", help="the everyday subset: the lab root, 5 files, 1k files")
    ap.add_argument("--huge", action="store_true", help="add the 1M-file tree (create and validate only)")
    ap.add_argument("--pairs", type=int, default=3, help="alternating pairs per job (at least 3)")
    ap.add_argument("--trees", nargs="*", help="only these trees (root root-nosparse t5 t1k t10k t100k t1m)")
    ap.add_argument("--jobs", nargs="*", choices=("create", "update", "validate", "clone"),
                    help="only these jobs (default: all that apply to each tree)")
    ap.add_argument("--export", default="xfs", choices=("xfs", "plain"), help="what the lab's /exports is")
    ap.add_argument("--spare", choices=SPARE_POLICIES,
                    help="qrmfs's `spare` setting (docs/updating.md; default: the config's, reflink)")
    args = ap.parse_args()
    if args.pairs < 3:
        ap.error("--pairs: at least 3, medians of fewer say little")
    name = os.environ.get("QRMFS_LAB_NAME") or "bench"
    if name == "qrmfs-lab":
        raise SystemExit("bench: refusing the default lab `qrmfs-lab` (someone else's); set QRMFS_LAB_NAME")
    started = dt.datetime.now(dt.UTC)
    compiled = compile_qrmfs()
    info = _lab.up(name, export=args.export)
    lab = Lab(info)
    lab.storage_pid = lab.find_storage_pid()
    load_before = os.getloadavg()
    bench = Bench(lab, args)
    t0 = time.perf_counter()
    with ssh_agent(lab):
        try:
            bench.run()
        finally:
            bench.cleanup()
    mode = "partial" if args.trees else "quick" if args.quick else "full"
    meta = {"started": started.strftime("%Y-%m-%d %H:%M UTC"), "mode": mode,
            "lab": name, "exports": info["hosts"]["storage"].get("exports"), "pairs": args.pairs,
            "seconds": time.perf_counter() - t0, "machine": machine(),
            "load_before": [round(x, 2) for x in load_before],
            "load_after": [round(x, 2) for x in os.getloadavg()], "anchor_excludes": bench.excludes,
            "qrmfs_package": compiled, "spare": args.spare or f"{SPARE_DEFAULT} (the default)"}
    rows = summarize(bench.results)
    RESULTS.mkdir(exist_ok=True)
    stem = RESULTS / f"{started.strftime('%Y-%m-%d-%H%M')}-{meta['mode']}"
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "summary": rows, "runs": bench.results},
                                                    indent=1) + "\n")
    md = markdown(meta, rows)
    stem.with_suffix(".md").write_text(md)
    print(md)
    print(f"bench: wrote {stem}.md and .json")


if __name__ == "__main__":
    main()
