"""The Ansible collection (ansible/ansible_collections/qrmfs/qrmfs): its argv building and result mapping
(pure), each module's documentation against its argument_spec (what `ansible-test sanity --test
validate-modules` checks; ansible-test itself cannot run here: it bootstraps pip from the internet), ansible-doc
and a syntax check of the example playbook, and the modules themselves run against a `local` storage server
(the real qrmfs CLI, agent and rsync on temp directories)."""

from __future__ import annotations

import importlib
import json
import os
import py_compile
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
COLLECTIONS = ROOT / "ansible"
COLLECTION = COLLECTIONS / "ansible_collections" / "qrmfs" / "qrmfs"
MODULES = ("qrmfs_image", "qrmfs_check", "qrmfs_images")
BIN = Path(sys.executable).parent
QRMFS = str(BIN / "qrmfs")

if str(COLLECTIONS) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS))
q: Any = importlib.import_module("ansible_collections.qrmfs.qrmfs.plugins.module_utils.qrmfs")


def params(**kw: Any) -> dict[str, Any]:
    base = {"qrmfs_bin": "qrmfs", "config": "/etc/q.toml", "name": "web1", "target": "nas1:/exports/web1",
            "source": "golden:/", "register": True}
    return {**base, **kw}


# --- argv -----------------------------------------------------------------------------------------------------

def test_create_argv_has_every_option_as_its_own_word_and_never_the_password() -> None:
    p = params(excludes=["/var/cache", "/a b"], private_add=["/var/lib/app"], private_exclude=None, arch="x86_64",
               operating_system="debian12", keep_services=False, keep_network=True, hostname="web1", route="ssh",
               shared=True, comment="a; rm -rf /", openqrm_user="admin", openqrm_password="s3cret",
               openqrm_password_file="/pw")
    argv = q.create_argv(p, check_mode=False)
    assert argv == ["qrmfs", "create", "-s", "web1", "-t", "nas1:/exports/web1", "-l", "golden:/", "--json",
                    "--config", "/etc/q.toml", "--exclude", "/var/cache", "--exclude", "/a b", "--private-add",
                    "/var/lib/app", "--arch", "x86_64", "--operating-system", "debian12", "--remove-services",
                    "--keep-network", "--hostname", "web1", "--route", "ssh", "--shared", "--comment",
                    "a; rm -rf /", "--username", "admin", "--password-file", "/pw"]
    assert "s3cret" not in argv
    assert q.create_argv(p, check_mode=True)[-1] == "--dry-run"


def test_register_false_is_only_physical_and_drops_the_credentials() -> None:
    p = params(register=False, openqrm_user="admin", openqrm_password_file="/pw")
    for argv in (q.create_argv(p, False), q.update_argv(p, False), q.remove_argv(p, False)):
        assert "--only-physical" in argv and "--username" not in argv and "--password-file" not in argv


def test_update_argv_overrides_generations_and_check_mode() -> None:
    argv = q.update_argv(params(source=None, shared=False, generations=2, config=None), check_mode=True)
    assert argv == ["qrmfs", "update", "-t", "nas1:/exports/web1", "--json", "--not-shared", "--keep-generations",
                    "2", "--dry-run"]
    assert q.update_argv(params(generations=0), False)[7:11] == ["-l", "golden:/", "--keep-generations", "0"]


def test_remove_list_validate_and_check_argv() -> None:
    assert q.remove_argv(params(), True) == ["qrmfs", "remove", "-t", "nas1:/exports/web1", "--yes", "--json",
                                             "--config", "/etc/q.toml", "--dry-run"]
    assert q.list_argv(params(), "nas1", generations=True) == ["qrmfs", "list", "nas1", "--json", "--config",
                                                               "/etc/q.toml", "--generations"]
    assert q.validate_argv(params(), fix=True, check_mode=True)[-2:] == ["--fix", "--dry-run"]
    assert "--fix" not in q.validate_argv(params(), fix=False, check_mode=True)
    assert q.check_argv(params(targets=["nas1", "nas2:/exports/x"], locations=["golden:/"]))[3:] == [
        "--config", "/etc/q.toml", "-t", "nas1", "-t", "nas2:/exports/x", "-l", "golden:/"]


# --- the envelope ---------------------------------------------------------------------------------------------

def test_envelope_ok_failure_and_garbage() -> None:
    ok = json.dumps({"schema": 1, "ok": True, "command": "list", "result": {"images": []}})
    assert q.parse_envelope(0, ok, "", ["qrmfs"]) == {"images": []}
    bad = json.dumps({"schema": 1, "ok": False, "command": "create",
                      "error": {"kind": "exists", "message": "nas1:/exports/web1 exists", "exit_code": 5,
                                "detail": "x"}})
    with pytest.raises(q.QrmfsFailure) as e:
        q.parse_envelope(5, bad, "", ["qrmfs", "create"])
    assert (e.value.rc, e.value.kind, e.value.message, e.value.detail) == (5, "exists", "nas1:/exports/web1 exists",
                                                                           "x")
    assert e.value.as_dict()["qrmfs_command"] == ["qrmfs", "create"]
    no = json.dumps({"schema": 1, "ok": False, "command": "validate", "result": {"clean": False},
                     "error": {"kind": "invalid", "message": "2 problem(s)", "exit_code": 12, "detail": ""}})
    with pytest.raises(q.QrmfsFailure) as e:
        q.parse_envelope(12, no, "", [])
    assert e.value.result == {"clean": False} and e.value.rc == 12
    with pytest.raises(q.QrmfsFailure, match="no JSON envelope.*Traceback") as e:
        q.parse_envelope(1, "", "Traceback\nboom\n", [])
    assert e.value.rc == 1
    with pytest.raises(q.QrmfsFailure, match="no JSON envelope"):
        q.parse_envelope(0, json.dumps({"schema": 2, "ok": True}), "", [])


def test_find_image_change_count_and_diffs() -> None:
    listing = {"images": [{"storage": "nas1", "path": "/exports/web1", "target": "nas1:/exports/web1"},
                          {"storage": "nas2", "path": "/exports/web1", "target": "nas2:/exports/web1"}]}
    assert q.find_image(listing, "nas2:/exports/web1")["storage"] == "nas2"
    assert q.find_image(listing, "nas1:/exports/web2") is None
    with pytest.raises(ValueError):
        q.find_image(listing, "nas1/exports/web1")
    plan = {"counts": {"new": 1, "changed": 2, "metadata": 0, "deleted": 1},
            "changes": [{"change": ">f+++++++++", "path": "/etc/a"}, {"change": "*deleting", "path": "/b"}],
            "truncated": True}
    assert q.change_count(plan) == 4 and q.change_count({"counts": {}}) == 0
    assert q.update_diff("nas1:/exports/web1", plan)["prepared"] == ">f+++++++++ /etc/a\n*deleting /b\n... (2 more)\n"
    facts = q.images_facts(listing, names=None)
    assert sorted(facts["by_storage"]) == ["nas1", "nas2"] and facts["errors"] == []
    assert q.check_summary({"checks": [{"name": "a", "status": "fail"}, {"name": "b", "status": "warn"},
                                       {"name": "c", "status": "ok"}]}) == {
        "checks": [{"name": "a", "status": "fail"}, {"name": "b", "status": "warn"}, {"name": "c", "status": "ok"}],
        "failed_checks": ["a"], "warnings_count": 1}


# --- the modules' documentation against their argument_spec (validate-modules' core checks) ---------------------

def _module(name: str) -> Any:
    return importlib.import_module(f"ansible_collections.qrmfs.qrmfs.plugins.modules.{name}")


@pytest.mark.parametrize("name", MODULES)
def test_documentation_matches_argument_spec(name: str) -> None:
    mod = _module(name)
    doc = yaml.safe_load(mod.DOCUMENTATION)
    assert doc["module"] == name and doc["short_description"] and doc["description"]
    spec = mod.argument_spec()
    assert sorted(doc["options"]) == sorted(spec), "documented options differ from the argument_spec"
    for opt, s in spec.items():
        d = doc["options"][opt]
        assert d.get("description"), opt
        assert d.get("type", "str") == s.get("type", "str"), opt
        assert d.get("required", False) == s.get("required", False), opt
        assert d.get("default") == s.get("default"), opt
        assert d.get("choices") == s.get("choices"), opt
        assert d.get("elements") == s.get("elements"), opt
        if "password" in opt and s.get("type") == "str":
            assert s.get("no_log") is True, opt
    assert isinstance(yaml.safe_load(mod.RETURN), dict)
    for task in yaml.safe_load(mod.EXAMPLES):
        used = [k for k in task if k.startswith("qrmfs.qrmfs.")]
        for k in used:
            assert k.split(".")[-1] in MODULES
            if k.endswith("." + name):
                assert set(task[k]) <= set(spec), f"an example uses options {set(task[k]) - set(spec)}"


@pytest.mark.parametrize("path", sorted(COLLECTION.rglob("*.py")), ids=lambda p: p.name)
def test_collection_files_compile_with_the_boilerplate(path: Path, tmp_path: Path) -> None:
    py_compile.compile(str(path), doraise=True, cfile=str(tmp_path / "c.pyc"))
    text = path.read_text()
    assert "from __future__ import absolute_import, division, print_function" in text
    assert "__metaclass__ = type" in text


def _ansible_env() -> dict[str, str]:
    return {**os.environ, "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS), "ANSIBLE_NOCOLOR": "1",
            "ANSIBLE_LOCAL_TEMP": "/tmp/.ansible-qrmfs-unit", "ANSIBLE_HOME": "/tmp/.ansible-qrmfs-unit"}


def test_ansible_doc_and_the_example_playbooks_syntax() -> None:
    r = subprocess.run([str(BIN / "ansible-doc"), "-t", "module", "--json",
                        *(f"qrmfs.qrmfs.{m}" for m in MODULES)], capture_output=True, text=True, env=_ansible_env())
    assert r.returncode == 0, r.stderr
    docs = json.loads(r.stdout)
    assert sorted(docs) == sorted(f"qrmfs.qrmfs.{m}" for m in MODULES)
    assert all(d["doc"]["options"] and d["examples"] and d["return"] for d in docs.values())
    r = subprocess.run([str(BIN / "ansible-playbook"), "--syntax-check", "-i", "localhost,",
                        str(COLLECTION / "examples" / "playbook.yml")], capture_output=True, text=True,
                       env=_ansible_env())
    assert r.returncode == 0, r.stdout + r.stderr


# --- the modules against a local storage server ------------------------------------------------------------------

@pytest.fixture
def local(tmp_path: Path, isolated_home: Path) -> dict[str, Any]:
    src = tmp_path / "src"
    for d in ("etc", "sbin", "usr/bin"):
        (src / d).mkdir(parents=True)
    (src / "etc/motd").write_text("hello\n")
    (src / "sbin/init").write_text("#!/bin/sh\n")
    (src / "sbin/init").chmod(0o755)
    (tmp_path / "exports").mkdir()
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'spool_dir = "{tmp_path}/spool"\n\n[storage.local]\naddress = "local"\n'
                   f'export_root = "{tmp_path}/exports"\n')
    return {"src": src, "cfg": str(cfg), "root": tmp_path / "exports", "tmp": tmp_path,
            "target": f"local:{tmp_path}/exports/img1"}


def run_module(local: dict[str, Any], module: str, check: bool = False, **args: Any) -> tuple[int, dict[str, Any]]:
    """Run a module as Ansible runs it (its args in a file), with the real qrmfs CLI."""
    a = {"qrmfs_bin": QRMFS, "config": local["cfg"], **args, "_ansible_check_mode": check, "_ansible_diff": True}
    f = local["tmp"] / "args.json"
    f.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": a}))
    r = subprocess.run([sys.executable, str(COLLECTION / "plugins" / "modules" / f"{module}.py"), str(f)],
                       capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(COLLECTIONS)})
    return r.returncode, json.loads(r.stdout)


def _tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_image_module_lifecycle_against_a_local_storage(local: dict[str, Any]) -> None:
    img = {"name": "img1", "target": local["target"], "register": False}
    code, out = run_module(local, "qrmfs_image", check=True, source=str(local["src"]), **img)
    assert code == 0 and out["changed"] and out["operation"] == "create" and out["result"]["dry_run"]
    assert _tree(local["root"]) == []  # check mode: nothing written
    code, out = run_module(local, "qrmfs_image", source=str(local["src"]), **img)
    assert code == 0 and out["changed"] and out["result"]["validation"] == "clean"
    assert out["diff"]["after"] == "present\n"
    code, out = run_module(local, "qrmfs_image", source=str(local["src"]), **img)
    assert code == 0 and not out["changed"] and out["image"]["name"] == "img1"

    code, out = run_module(local, "qrmfs_image", state="updated", **img)
    assert code == 0 and not out["changed"] and sum(out["changes"].values()) == 0
    (local["src"] / "etc/motd").write_text("hello again, longer\n")
    before = _tree(local["root"])
    code, out = run_module(local, "qrmfs_image", check=True, state="updated", **img)
    assert code == 0 and out["changed"] and out["changes"]["changed"] == 1 and "/etc/motd" in out["diff"]["prepared"]
    assert _tree(local["root"]) == before
    code, out = run_module(local, "qrmfs_image", state="updated", generations=0, **img)
    assert code == 0 and out["changed"] and out["result"]["command"] == "update"
    assert out["result"]["changes"]["changed"] >= 1
    assert (local["root"] / "img1/etc/motd").read_text() == "hello again, longer\n"
    assert not [p for p in local["root"].iterdir() if ".qrmfs-gen-" in p.name]  # generations: 0

    code, out = run_module(local, "qrmfs_images", names=["img1", "other"], validate=True)
    assert code == 0 and [i["name"] for i in out["images"]] == ["img1"] and out["images"][0]["clean"]
    assert out["invalid"] == [] and "img1" in out["by_storage"]["local"]

    code, out = run_module(local, "qrmfs_image", check=True, state="absent", **img)
    assert code == 0 and out["changed"] and (local["root"] / "img1").is_dir()
    code, out = run_module(local, "qrmfs_image", state="absent", **img)
    assert code == 0 and out["changed"] and _tree(local["root"]) == []
    code, out = run_module(local, "qrmfs_image", state="absent", **img)
    assert code == 0 and not out["changed"]


def test_image_module_repairs_a_broken_image_and_reports_failures(local: dict[str, Any]) -> None:
    img = {"name": "img1", "target": local["target"], "register": False, "source": str(local["src"])}
    assert run_module(local, "qrmfs_image", **img)[0] == 0
    mtab = local["root"] / "img1/etc/mtab"
    mtab.unlink()  # the preparation made it a link to /proc/self/mounts; a file is what validate finds, --fix repairs
    mtab.write_text("/dev/sda1 / ext4 rw 0 0\n")
    code, out = run_module(local, "qrmfs_images", validate=True)
    assert code == 1 and out["rc"] == 12 and out["invalid"] == [local["target"]] and out["images"][0]["findings"]
    code, out = run_module(local, "qrmfs_image", check=True, **img)
    assert code == 0 and out["changed"] and out["operation"] == "fix" and "mtab" in out["diff"]["prepared"]
    assert (local["root"] / "img1/etc/mtab").is_file() and not (local["root"] / "img1/etc/mtab").is_symlink()
    code, out = run_module(local, "qrmfs_image", **img)
    assert code == 0 and out["changed"] and out["operation"] == "fix"
    assert run_module(local, "qrmfs_image", **img)[1]["changed"] is False

    # failures carry qrmfs's exit code, kind and message
    code, out = run_module(local, "qrmfs_image", name="img2", target=local["target"].replace("img1", "img2"),
                           source=str(local["tmp"] / "missing"), register=False)
    assert code == 1 and out["failed"] and out["rc"] == 2 and out["kind"] == "usage"  # refused before anything
    assert out["operation"] == "create" and "is not a directory on this machine" in out["msg"]
    code, out = run_module(local, "qrmfs_image", name="img3", target="local:/elsewhere/img3", source="/",
                           register=False)  # outside the export root: refused before anything is touched
    assert code == 1 and out["rc"] == 2 and out["kind"] == "usage" and "export root" in out["msg"]
    code, out = run_module(local, "qrmfs_image", name="img3", target=local["target"].replace("img1", "img3"))
    assert code == 1 and out["kind"] == "usage" and "source is required" in out["msg"]
    code, out = run_module(local, "qrmfs_check", targets=["local"], locations=[str(local["tmp"] / "missing")])
    assert code == 1 and out["rc"] == 15 and out["failed_checks"]
