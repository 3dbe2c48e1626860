"""Which nodes run which generation (agent/holds.py), and that pruning, the spare, remove and gc respect it:
real temp trees, records written as qrmfs-init writes them, and records a hostile node could write."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from qrmfs.agent import gens, holds, tree
from qrmfs.agent.manifest import Manifest
from qrmfs.agent.protocol import AgentError, ErrorKind

TIMEOUT = 60


def _image(d: Path, gen_id: str) -> Path:
    (d / "etc").mkdir(parents=True)
    (d / "etc/tag").write_text(gen_id)
    tree.write_manifest(str(d), Manifest.new({"image": d.name.lstrip("."), "generation": {"id": gen_id}}))
    return d


def _record(top: Path, node: str, gen: str, seen_ago: float = 0, since_ago: float = 100) -> Path:
    """A node's record as qrmfs-init writes it: `running` (the generation id), `alive` (the heartbeat)."""
    d = top / holds.NODES / node
    d.mkdir(parents=True, exist_ok=True)
    now = time.time()
    (d / holds.RUNNING).write_text(gen + "\n")
    os.utime(d / holds.RUNNING, (now - since_ago, now - since_ago))
    (d / holds.ALIVE).write_text("")
    os.utime(d / holds.ALIVE, (now - seen_ago, now - seen_ago))
    return d


@pytest.fixture
def img(tmp_path: Path) -> Path:
    """An image with three earlier generations: gen-1 (id g1..), gen-2, gen-3, the image (id cc..)."""
    root = tmp_path / "exports"
    for seq in (1, 2, 3):
        _image(root / f".img1.qrmfs-gen-{seq}", f"{seq:0>8}")
    return _image(root / "img1", "c" * 32)


def _held(img: Path) -> dict[str, list[str]]:
    return {Path(t).name: [h.node for h in hs] for t, hs in gens.held_trees(str(img), TIMEOUT).items()}


def test_write_manifest_puts_the_generation_id_beside_it(tmp_path: Path) -> None:
    d = _image(tmp_path / "img", "0123abcd" * 4)
    assert (d / ".qrmfs/generation").read_text() == "0123abcd" * 4 + "\n"
    tree.write_manifest(str(d), Manifest.new({"image": "img"}))  # no generation: no stale id left behind
    assert not (d / ".qrmfs/generation").exists()


def test_a_fresh_record_holds_the_generation_it_names_wherever_the_record_lies(img: Path) -> None:
    _record(img, "1", "00000001")                                    # state moved along with the image
    _record(img.parent / ".img1.qrmfs-gen-2", "7", "00000002")       # state a node left in the tree it booted
    _record(img, "2", "c" * 32)                                      # a node on the current image
    assert _held(img) == {".img1.qrmfs-gen-1": ["1"], ".img1.qrmfs-gen-2": ["7"], "img1": ["2"]}
    h = gens.held_trees(str(img), TIMEOUT)[str(img.parent / ".img1.qrmfs-gen-1")][0]
    assert h.generation == "00000001" and h.since < h.seen <= time.time()


def test_a_record_stops_holding_after_the_timeout_or_when_the_node_booted_another_generation(img: Path) -> None:
    _record(img, "1", "00000001", seen_ago=TIMEOUT + 5)   # powered off without a clean shutdown
    d = _record(img, "2", "00000002")
    assert _held(img) == {".img1.qrmfs-gen-2": ["2"]}
    _record(img, "2", "c" * 32)                           # node 2 rebooted into the current image
    assert _held(img) == {"img1": ["2"]} and (d / holds.RUNNING).read_text() == "c" * 32 + "\n"


def _hostile(img: Path, outside: Path) -> None:
    """Records no node may be believed for: each would hold gen-1 if it were read."""
    gen1 = "00000001"
    (outside / "secret").write_text(gen1 + "\n")
    nodes = img / holds.NODES
    d = _record(img, "huge", gen1)
    (d / holds.RUNNING).write_bytes(gen1.encode() + b"\n" + b"0" * 10_000)
    d = _record(img, "binary", gen1)
    (d / holds.RUNNING).write_bytes(b"\x00\xff" + gen1.encode())
    d = _record(img, "two", gen1)
    (d / holds.RUNNING).write_text(f"{gen1}\n00000002\n")
    d = _record(img, "link", gen1)
    (d / holds.RUNNING).unlink()
    (d / holds.RUNNING).symlink_to(outside / "secret")  # a symlink out of the image
    d = _record(img, "alivelink", gen1)
    (d / holds.ALIVE).unlink()
    (d / holds.ALIVE).symlink_to(outside / "secret")
    d = _record(img, "fifo", gen1)
    (d / holds.RUNNING).unlink()
    os.mkfifo(d / holds.RUNNING)                        # would block a plain open
    d = _record(img, "future", gen1)
    os.utime(d / holds.ALIVE, (time.time() + 86400 * 365, time.time() + 86400 * 365))  # touch -d 2027
    d = _record(img, "past", gen1)
    os.utime(d / holds.ALIVE, (0, 0))
    _record(img, "unknown", "deadbeef")                 # a generation this image does not have
    (nodes / "dirlink").symlink_to(outside)             # a node directory that is a symlink
    _record(outside, "x", gen1)
    (nodes / "not a node").mkdir()
    (nodes / "not a node" / holds.RUNNING).write_text(gen1)
    (nodes / "not a node" / holds.ALIVE).write_text("")
    (nodes / "plainfile").write_text(gen1)


def test_hostile_records_are_ignored_never_followed_and_never_crash(img: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    _hostile(img, outside)
    assert _held(img) == {}
    gone, failed, kept = gens.prune(str(img), 1, "never", TIMEOUT)
    assert [Path(g).name for g in gone] == [".img1.qrmfs-gen-1", ".img1.qrmfs-gen-2"] and not failed and not kept
    assert (outside / "secret").read_text() == "00000001\n"


def test_a_symlinked_nodes_directory_is_not_followed(img: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    _record(outside, "1", "00000001")
    (img / ".qrmfs/nodes").symlink_to(outside / holds.NODES)
    assert _held(img) == {}
    (img / ".qrmfs/nodes").unlink()
    (img / ".qrmfs").rename(img / ".qrmfs-real")
    (img / ".qrmfs").symlink_to(outside / ".qrmfs")
    assert _held(img) == {}


def test_node_directories_are_read_up_to_a_bound(img: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(holds, "MAX_NODES", 3)
    for n in range(10):
        _record(img, f"n{n}", "00000001")
    assert len(_held(img)[".img1.qrmfs-gen-1"]) <= 3


def test_prune_keeps_held_generations_and_never_makes_one_the_spare(img: Path) -> None:
    _record(img, "1", "00000002")  # gen-2 held; with keep 0 gen-3 would be the spare and gen-1, gen-2 deleted
    gone, failed, kept = gens.prune(str(img), 0, "always", TIMEOUT)
    assert [Path(g).name for g in gone] == [".img1.qrmfs-gen-1", ".img1.qrmfs-gen-3"] and not failed
    assert [(Path(k.path).name, [h.node for h in k.nodes]) for k in kept] == [(".img1.qrmfs-gen-2", ["1"])]
    spare = Path(tree.siblings(str(img)).spare)
    assert (spare / "etc/tag").read_text() == "00000003"  # the newest generation no node runs
    assert (img.parent / ".img1.qrmfs-gen-2/etc/tag").read_text() == "00000002"
    # the node rebooted into the current image: the next prune (gc) frees gen-2
    _record(img, "1", "c" * 32)
    pruned = gens.op_prune(str(img), str(img.parent), 0, "always", TIMEOUT)
    assert [Path(g).name for g in pruned.pruned] == [".img1.qrmfs-gen-2"] and not pruned.held
    assert (spare / "etc/tag").read_text() == "00000003"  # one spare at most: gen-2 was deleted


def test_a_held_spare_is_not_recycled_as_the_staging_copy(img: Path) -> None:
    gens.prune(str(img), 2, "always", TIMEOUT)  # gen-1 becomes the spare
    spare = Path(tree.siblings(str(img)).spare)
    assert (spare / "etc/tag").read_text() == "00000001"
    _record(img, "1", "00000001")  # a node that booted it long ago, not heard of at the prune
    up = gens.op_stage_update(str(img), str(img.parent), "tok", None, TIMEOUT)
    assert up.recycled is None and (spare / "etc/tag").read_text() == "00000001"
    assert up.entries == ["etc"]


def test_publish_update_reports_what_it_kept_for_nodes(img: Path) -> None:
    staging = _image(img.parent / ".img1.qrmfs-staging-x", "d" * 32)
    _record(img, "1", "c" * 32)  # a node runs the image that becomes the newest generation
    _record(img, "2", "00000001")
    swapped = gens.op_publish_update(str(img), str(img.parent), str(staging), 0, "never", TIMEOUT)
    held = {Path(h.path).name: [n.node for n in h.nodes] for h in swapped.held}
    assert held == {".img1.qrmfs-gen-4": ["1"], ".img1.qrmfs-gen-1": ["2"]}
    assert [Path(p).name for p in swapped.pruned] == [".img1.qrmfs-gen-2", ".img1.qrmfs-gen-3"]
    assert (img.parent / ".img1.qrmfs-gen-4/etc/tag").read_text() == "c" * 32
    listed = gens.op_generations(str(img), str(img.parent), node_timeout=TIMEOUT)
    assert [(Path(g.path).name, [n.node for n in g.nodes]) for g in listed.generations] == [
        ("img1", []), (".img1.qrmfs-gen-4", ["1"]), (".img1.qrmfs-gen-1", ["2"])]


def test_remove_is_refused_while_nodes_run_the_image_unless_the_operator_says_so(img: Path) -> None:
    _record(img, "web-7", "00000003")
    with pytest.raises(AgentError) as ei:
        tree.op_remove(str(img), str(img.parent), False, node_timeout=TIMEOUT)
    assert ei.value.kind is ErrorKind.REFUSED and "node web-7 (since " in str(ei.value)
    assert ".img1.qrmfs-gen-3" in str(ei.value) and img.is_dir()
    assert len(list(img.parent.iterdir())) == 4
    tree.op_remove(str(img), str(img.parent), False, running_ok=True, node_timeout=TIMEOUT)
    assert list(img.parent.iterdir()) == []


QRMFS_INIT = Path(__file__).resolve().parents[3] / "qrmfs" / "data" / "qrmfs-init"


def _init(tmp_path: Path, snippet: str, cmdline: str = "") -> subprocess.CompletedProcess[str]:
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    env = {**os.environ, "QRMFS_INIT_SOURCED": "1", "QRMFS_ROOT": str(tmp_path / "root"),
           "QRMFS_CMDLINE_FILE": str(tmp_path / "cmdline"), "QRMFS_CONSOLE": str(tmp_path / "console"),
           "QRMFS_KMSG": str(tmp_path / "no-kmsg")}
    return subprocess.run(["sh", "-c", f'. "$1"; {snippet}', "sh", str(QRMFS_INIT)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_qrmfs_init_writes_the_record_the_agent_reads(tmp_path: Path) -> None:
    root = _image(tmp_path / "root", "ab" * 16)
    node = root / holds.NODES / "1"
    node.mkdir(parents=True)
    r = _init(tmp_path, f'report_running "{node}"; echo "every=$(heartbeat_seconds)"', "qrmfs.heartbeat=5")
    assert r.returncode == 0 and r.stdout == "every=5\n", r.stderr
    assert (node / holds.RUNNING).read_text() == "ab" * 16 + "\n"
    assert [h.node for h in holds.records([str(root)], TIMEOUT)] == ["1"]
    assert "running generation " + "ab" * 16 in (tmp_path / "console").read_text()


@pytest.mark.parametrize("given", ["", "qrmfs.heartbeat=0", "qrmfs.heartbeat=5s", "qrmfs.heartbeat=-1"])
def test_qrmfs_init_heartbeat_defaults_to_a_minute(tmp_path: Path, given: str) -> None:
    assert _init(tmp_path, "heartbeat_seconds", given).stdout == "60"


def test_qrmfs_init_without_a_generation_id_says_so_and_writes_nothing(tmp_path: Path) -> None:
    node = tmp_path / "root" / holds.NODES / "1"
    node.mkdir(parents=True)
    (tmp_path / "root/.qrmfs/generation").write_text("../../etc/passwd\n")
    r = _init(tmp_path, f'report_running "{node}"')
    assert r.returncode == 1 and list(node.iterdir()) == []
    assert "no generation id" in (tmp_path / "console").read_text()


def test_the_image_is_never_fixed_in_place_while_a_node_runs_it_only_its_staging_copy(img: Path) -> None:
    """validate --fix's preparation of the image itself (no staging root) is refused while a node runs the
    image, the node named and nothing changed; a staging copy (update) is prepared; once the node rebooted into
    another generation, the image is fixed in place."""
    from qrmfs.agent import main
    from qrmfs.agent.protocol import Options

    opts = Options.from_dict({"image": "img1"})
    (img / "etc/machine-id").write_text("0123456789abcdef0123456789abcdef\n")  # a fault the preparation fixes
    _record(img, "web-7", "c" * 32)
    with pytest.raises(AgentError) as ei:
        main.op_prepare(str(img), str(img.parent), opts, None, node_timeout=TIMEOUT)
    assert ei.value.kind is ErrorKind.REFUSED, ei.value
    assert "node web-7 (since " in str(ei.value) and "qrmfs update" in str(ei.value), ei.value
    assert (img / "etc/machine-id").read_text() == "0123456789abcdef0123456789abcdef\n"
    assert not (img / "proc").exists(), "nothing of the image changed"

    staging = img.parent / ".img1.qrmfs-staging-1234"
    (staging / "etc").mkdir(parents=True)
    with pytest.raises(AgentError, match="node web-7"):  # the image named as its own root is the image
        main.op_prepare(str(img), str(img.parent), opts, str(img), node_timeout=TIMEOUT)
    main.op_prepare(str(img), str(img.parent), opts, str(staging), node_timeout=TIMEOUT)
    assert (staging / "proc").is_dir()

    _record(img, "web-7", "00000003")  # it rebooted into another generation: the image is free
    fixed = main.op_prepare(str(img), str(img.parent), opts, None, node_timeout=TIMEOUT).fixed
    assert any(f.step == "machine-id" for f in fixed) and (img / "proc").is_dir(), fixed
