"""qrmfs/agent/manifest.py: every manifest an earlier qrmfs wrote is read (migrated to the current schema);
anything else is refused with one line naming the file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qrmfs.agent import manifest as M
from qrmfs.agent import tree
from qrmfs.agent.manifest import Manifest, ManifestError
from qrmfs.errors import RefusedError
from qrmfs.results import Registration, RegState
from qrmfs.storage import StorageSide

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "manifests"
OLD = sorted(p for p in FIXTURES.glob("*.json") if not p.stem.endswith("-registered"))  # made with -o
REGISTERED = sorted(FIXTURES.glob("*-registered.json"))  # made registered with an openQRM


def test_the_fixtures_are_there() -> None:
    assert len(OLD) >= 8 and all(json.loads(p.read_text()).get("schema") is None for p in OLD)
    assert [(p.stem, json.loads(p.read_text()).get("schema"), json.loads(p.read_text())["registration"]["state"])
            for p in REGISTERED] == [("bf45072-img1-registered", None, "registered"),
                                     ("ca0dd16-img1-registered", 2, "registered")]


@pytest.mark.parametrize("path", REGISTERED, ids=lambda p: p.stem)
def test_a_registration_an_earlier_qrmfs_called_registered_is_read_as_sent(path: Path, tmp_path: Path) -> None:
    """openQRM 5.3 shows no record: what an earlier qrmfs recorded as "registered" was openQRM's answer, never
    the record. It reads as "sent", its time and how kept, with what that qrmfs saw (or, where it wrote
    nothing, that it saw only the 200); everything that asks "is it registered?" treats it as before."""
    old = json.loads(path.read_text())["registration"]
    m = Manifest.parse(path.read_text(), str(path))
    reg = Registration.of_manifest(m)
    assert (reg.state, reg.time, reg.via) == (RegState.SENT, old["time"], "create") and reg.has_record
    assert reg.seen == old.get("seen", M.REGISTERED_BEFORE)
    assert "record is not seen" in reg.seen if "seen" in old else "neither the record nor the role" in reg.seen
    assert str(reg) == f"sent ({old['time']} by create; {reg.seen})"
    assert m.image == "img1" and m.option("shared") is True and m.option("private_add") == ["/var/lib/app"]
    tree.write_manifest(str(tmp_path), m)  # written as schema 3, read again as it is
    assert json.loads((tmp_path / M.PATH).read_text())["registration"] == {**old, "state": "sent", "seen": reg.seen}
    assert tree.read_manifest(str(tmp_path)) == m


@pytest.mark.parametrize("reg", [{"state": "pending", "spool_job": "j1"}, {"state": "not_registered"},
                                 {"state": "unknown", "spool_job": "j1", "error": "pending in the manifest"}])
def test_the_migration_leaves_every_other_registration_as_it_was(reg: dict[str, str]) -> None:
    assert Manifest.load({"schema": 2, "image": "img1", "registration": reg}).data["registration"] == reg


@pytest.mark.parametrize("path", OLD, ids=lambda p: p.stem)
def test_every_manifest_an_earlier_qrmfs_wrote_is_read(path: Path) -> None:
    m = Manifest.parse(path.read_text(), str(path))
    assert m.data["schema"] == M.SCHEMA
    assert m.image == "img1" and m.path and m.path.endswith("/exports/img1") and m.source == "/tmp/h23b/fx/src"
    assert m.route == "ssh" and m.created and m.made and m.made_by
    assert Registration.of_manifest(m).state is RegState.NOT_REGISTERED  # "not registered (-o)" included
    assert isinstance(m.files, int) and m.files > 0 and isinstance(m.bytes, int)
    assert m.option("image") == "img1" and m.option("keep_services") is True and m.excludes == []
    assert m.prepared_paths and all(p.startswith("/") for p in m.prepared_paths)
    assert m.validation_state in ("clean", "problems")
    with_generations = path.stem.split("-")[0] not in ("3def964", "fba6867")
    assert (m.generation_id is not None) is with_generations
    if path.stem.endswith("gen-1") or not with_generations:
        return
    assert m.made_by == "update" and m.base_copy_method == "copy"
    assert m.changes and all(isinstance(n, int) for n in m.changes.values())  # before 185506c: rsync's own stats
    if path.stem.startswith("bf45072"):
        assert set(M.CHANGE_KINDS) <= set(m.changes)
    parent = Manifest.parse((FIXTURES / f"{path.stem}-gen-1.json").read_text())
    assert m.generation["parent"] == parent.generation_id  # the generation it replaced


def test_a_migrated_manifest_is_written_with_its_schema_and_read_again_as_it_is(tmp_path: Path) -> None:
    old = Manifest.parse((FIXTURES / "fba6867-img1.json").read_text())
    tree.write_manifest(str(tmp_path), old)
    written = json.loads((tmp_path / M.PATH).read_text())
    assert written["schema"] == M.SCHEMA and written["registration"] == {"state": "not_registered"}
    assert tree.read_manifest(str(tmp_path)) == old


@pytest.mark.parametrize(("text", "why"), [
    ("{broken", "is not JSON"),
    ("", "is not JSON"),
    ('["img1"]', "is not a JSON object"),
    ('"img1"', "is not a JSON object"),
    ("null", "is not a JSON object"),
    (json.dumps({"schema": M.SCHEMA + 1, "image": "img1"}), f"has schema {M.SCHEMA + 1}, newer than this qrmfs reads"),
    ('{"schema": "2"}', "names no schema qrmfs knows ('2')"),
    ('{"schema": 0}', "names no schema qrmfs knows (0)"),
    ('{"schema": true}', "names no schema qrmfs knows (True)"),
])
def test_anything_else_is_refused_in_one_line_naming_the_file(tmp_path: Path, text: str, why: str) -> None:
    (tmp_path / ".qrmfs").mkdir()
    (tmp_path / M.PATH).write_text(text)
    with pytest.raises(ManifestError) as e:
        tree.read_manifest(str(tmp_path))
    assert str(e.value).startswith(f"{tmp_path / M.PATH} {why}") and "\n" not in str(e.value)


def test_through_the_agent_inspect_names_a_manifest_it_cannot_read_and_update_refuses(
        side: StorageSide, root: Path) -> None:
    """A manifest of a newer qrmfs: the image is not touched (not taken for a plain directory either)."""
    img = root / "img1"
    (img / ".qrmfs").mkdir(parents=True)
    (img / M.PATH).write_text(json.dumps({"schema": M.SCHEMA + 1, "image": "img1"}))
    info = side.inspect(str(img))
    assert (info.exists, info.is_image, info.manifest) == (True, False, None)
    assert info.manifest_error == (f"{img / M.PATH} has schema {M.SCHEMA + 1}, newer than this qrmfs reads "
                                   f"({M.SCHEMA}): use a qrmfs as new as the one that wrote it")
    with pytest.raises(RefusedError, match="newer than this qrmfs reads"):
        side.manifest_update(str(img), {"registration": {"state": "sent"}})
    with pytest.raises(RefusedError, match="newer than this qrmfs reads"):
        side.stage(str(root / "img1/inner"), "t")  # an image inside it is refused as inside any image
    assert json.loads((img / M.PATH).read_text())["schema"] == M.SCHEMA + 1  # as it was


def test_an_old_manifest_comes_through_the_agent_migrated(side: StorageSide, root: Path) -> None:
    img = root / "img1"
    (img / ".qrmfs").mkdir(parents=True)
    (img / M.PATH).write_text((FIXTURES / "3def964-img1.json").read_text())
    m = side.inspect(str(img)).manifest
    assert m is not None and m.data["schema"] == M.SCHEMA and m.registration.state == "not_registered"
    (listed,) = side.list().images
    assert listed.manifest == m
