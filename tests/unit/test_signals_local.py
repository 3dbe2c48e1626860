"""Signals always end a run (issue 26, item 4), against a local storage server (no docker).

1. The client/agent framing: one agent session answers many requests in order; SIGTERM raises Interrupted
   wherever the main thread is, so it lands at random instants between sending a request, reading its answer
   and storing it. A bounded randomized loop (hundreds of request sequences, each cut by a signal at a random
   instant) checks after each cut that the next answers are the right ones: a signal that landed between
   reading an answer and storing it used to leave the client reading answers one behind, and then waiting
   forever for an answer the agent had already given (qrmfs hung holding the image's lock, issue 26 #4).
2. Real qrmfs runs: `update` processes stopped by SIGTERM or SIGINT at random instants end in bounded time,
   with a documented outcome, the lock released and the image whole."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from qrmfs import config
from qrmfs.agent import protocol as P
from qrmfs.errors import Interrupted, interrupt
from qrmfs.runner import Runner
from qrmfs.storage import StorageSide

RUNS = 300


def framing_loop(root: str, runs: int, seed: int) -> dict[str, int]:
    """In this process: `runs` request sequences on one agent session, each cut by SIGALRM (raising
    Interrupted through qrmfs's own handler's function) at a random instant; after each, the next answers are
    checked. Returns the counts of outcomes."""
    rng = random.Random(seed)
    cfg = config.parse({"storage": {"local": {"address": "local", "export_root": root}}})
    side = StorageSide(cfg.storage_for("local"), Runner())
    img = os.path.join(root, "img1")

    armed = [False]

    def on_alarm(_n: int, _f: object) -> None:
        if armed[0]:
            interrupt(signal.SIGTERM)  # what qrmfs's own SIGTERM handler does (cli._stop_on_signals)

    signal.signal(signal.SIGALRM, on_alarm)
    counts = {"runs": 0, "interrupted": 0, "completed": 0, "checked": 0}
    side.connect()
    side.inspect(img)  # the session is up: every cut below lands in the request/answer traffic

    def sequence() -> None:
        later = side.start_check(img, P.Options("img1"))
        side.inspect(img)
        side.stats(img)
        side.generations(img)
        later.result()

    t0 = time.monotonic()
    sequence()
    span = (time.monotonic() - t0) * 1.1  # the cuts fall anywhere in a sequence, a few after its end
    for _ in range(runs):
        counts["runs"] += 1
        try:
            try:
                armed[0] = True
                signal.setitimer(signal.ITIMER_REAL, rng.uniform(1e-6, span))
                sequence()
                counts["completed"] += 1
            finally:
                armed[0] = False
                signal.setitimer(signal.ITIMER_REAL, 0)
        except Interrupted:
            armed[0] = False
            counts["interrupted"] += 1
        # the answers that follow are each its own request's (a wrong one fails to decode or differs)
        i = side.inspect(img)
        assert isinstance(i, P.Inspected) and i.exists and i.is_image, i
        g = side.generations(img)
        assert isinstance(g, P.GenerationList) and g.generations[0].path == img, g
        s = side.stats(img)
        assert isinstance(s, P.Counts) and s.files > 0, s
        counts["checked"] += 1
    side.close()
    return counts


def _image(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, str]]:
    root, src = tmp_path / "exports", tmp_path / "src"
    root.mkdir()
    for d in ("etc", "usr/bin", "sbin"):
        (src / d).mkdir(parents=True)
    (src / "etc/hostname").write_text("src\n")
    for i in range(200):
        (src / "usr/bin" / f"tool{i}").write_text(f"{i}\n" * 50)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'spool_dir = "{tmp_path / "spool"}"\nkeep_generations = 1\n'
                   f'[storage.local]\naddress = "local"\nexport_root = "{root}"\n')
    env = {**os.environ, "HOME": str(tmp_path), "QRMFS_PASSWORD": ""}
    r = subprocess.run([sys.executable, "-m", "qrmfs", "create", "-t", f"local:{root}/img1", "-l", str(src), "-o",
                        "--config", str(cfg)], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    return root, src, cfg, env


def test_signals_at_random_instants_never_desynchronise_the_agent_session(tmp_path: Path) -> None:
    root, _src, _cfg, env = _image(tmp_path)
    seed = random.randrange(2**32)
    code = ("import json, sys; from tests.unit.test_signals_local import framing_loop; "
            f"print(json.dumps(framing_loop({str(root)!r}, {RUNS}, {seed})))")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120,
                       cwd=Path(__file__).parents[2])
    assert r.returncode == 0, f"seed {seed}: {r.stderr[-3000:]}"
    counts = json.loads(r.stdout)
    print(f"framing loop (seed {seed}): {counts} in {time.monotonic() - t0:.1f} s")
    assert counts["runs"] == counts["checked"] == RUNS
    assert counts["interrupted"] >= RUNS // 4 and counts["completed"] >= 1  # the cuts fell all along the traffic


def test_sigterm_or_sigint_at_random_instants_of_update_ends_it_with_the_lock_released(tmp_path: Path) -> None:
    root, src, cfg, env = _image(tmp_path)
    rng = random.Random()
    outcomes: dict[str, int] = {}
    t0 = time.monotonic()
    runs = 0
    while time.monotonic() - t0 < 40 and runs < 60:
        runs += 1
        (src / "etc/hostname").write_text(f"run {runs}\n")
        p = subprocess.Popen([sys.executable, "-m", "qrmfs", "update", "-t", f"local:{root}/img1", "-l", str(src),
                              "-o", "--config", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=env)
        time.sleep(rng.uniform(0.05, 3.0))  # the random instant (nothing waits for readiness here: any is right)
        sig = rng.choice((signal.SIGTERM, signal.SIGINT))
        p.send_signal(sig)
        sent = time.monotonic()
        _out, err = p.communicate(timeout=60)  # bounded: a hang fails here
        took = time.monotonic() - sent
        assert took < 30, (took, err)
        assert "Traceback" not in err, err
        # 0: it had finished; 128+N: stopped, and it says so (while Python loaded it, at once: nothing begun);
        # -N: the signal's default action, before the interpreter ran a line of qrmfs (on a loaded machine its
        # start-up can outlast the shortest wait): nothing of qrmfs ran, so it can say nothing
        assert p.returncode in (0, 128 + sig, -sig), (p.returncode, err)
        key = ("finished" if p.returncode == 0 else "killed before qrmfs ran" if p.returncode < 0 else
               "interrupted before anything was done" if "before anything was done" in err else
               f"interrupted ({signal.Signals(sig).name})")
        outcomes[key] = outcomes.get(key, 0) + 1
        if p.returncode < 0:
            assert err == "", err
        if p.returncode > 0:
            assert f"interrupted by {signal.Signals(sig).name}" in err, err
        # the lock is free and the image whole: the next operation runs at once
        r = subprocess.run([sys.executable, "-m", "qrmfs", "list", "--generations", "-t", f"local:{root}/img1",
                            "--json", "--config", str(cfg)], capture_output=True, text=True, env=env, timeout=60)
        assert r.returncode == 0, r.stderr
        assert json.loads((root / "img1/.qrmfs/manifest.json").read_text())["image"] == "img1"
    print(f"update stopped at random instants: {runs} runs in {time.monotonic() - t0:.1f} s: {outcomes}")
    assert sum(outcomes.values()) == runs >= 5
    assert any(k.startswith("interrupted") for k in outcomes)


