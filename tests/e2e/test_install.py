"""Install like an operator: build the wheel from the checkout's files, install it into a fresh venv (as pipx
does), and run the installed qrmfs: --version, its data files, no top-level `lab` package, and a real
`qrmfs check` against the lab."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import qrmfs

from .helpers import write_config

pytestmark = [pytest.mark.e2e, pytest.mark.install]
REPO = Path(__file__).resolve().parents[2]


def sh(*argv: str | Path, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "QRMFS_CONFIG")}
    r = subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=cwd, timeout=timeout, env=env)
    assert r.returncode == 0, f"{argv}: exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("install")
    # The project's files as git sees them (tracked and new, not ignored): no stale build/ or .venv leaks in.
    files = sh("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout.split("\0")
    src = tmp / "src"
    for f in filter(None, files):
        if (REPO / f).is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes((REPO / f).read_bytes())
    dist = tmp / "dist"
    sh(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", dist, src, cwd=tmp)
    wheels = list(dist.glob("qrmfs-*.whl"))
    assert len(wheels) == 1, wheels
    venv = tmp / "venv"
    sh(sys.executable, "-m", "venv", venv, cwd=tmp)
    sh(venv / "bin" / "pip", "install", "-q", wheels[0], cwd=tmp)
    return {"tmp": tmp, "wheel": wheels[0], "venv": venv, "bin": venv / "bin"}


def test_wheel_holds_qrmfs_and_its_data_but_no_lab(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    tops = {n.split("/")[0] for n in names}
    assert tops == {"qrmfs", f"qrmfs-{qrmfs.__version__}.dist-info"}
    assert "qrmfs/data/qrmfs-init" in names
    assert "qrmfs/agent/main.py" in names  # the storage-side helper travels from the installed package


def test_installed_qrmfs_runs_from_anywhere(installed):
    cwd = installed["tmp"]  # not the checkout: nothing of the repository is importable here
    r = sh(installed["bin"] / "qrmfs", "--version", cwd=cwd)
    assert r.stdout == f"qrmfs {qrmfs.__version__}\n"
    probe = ("import importlib.util, importlib.resources as r, qrmfs, json; "
             "print(json.dumps({'lab': importlib.util.find_spec('lab') is not None, 'qrmfs': qrmfs.__file__, "
             "'init': (r.files('qrmfs') / 'data' / 'qrmfs-init').read_text()}))")
    got = json.loads(sh(installed["bin"] / "python", "-c", probe, cwd=cwd).stdout)
    assert got["lab"] is False
    assert got["qrmfs"].startswith(str(installed["venv"]))
    assert got["init"] == (REPO / "qrmfs" / "data" / "qrmfs-init").read_text()
    site = next((installed["venv"] / "lib").glob("python3*/site-packages"))
    assert not (site / "lab").exists()
    assert (installed["bin"] / "qrmfs").exists()


def test_installed_qrmfs_check_against_the_lab(installed, lab, tmp_path):
    cfg = write_config(lab, tmp_path)
    env_cwd = installed["tmp"]
    r = subprocess.run([str(installed["bin"] / "qrmfs"), "check", "-t", "storage:/exports/installcheck",
                        "-l", "source:/", "--json", "--config", cfg], capture_output=True, text=True, timeout=300,
                       cwd=env_cwd)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = json.loads(r.stdout)
    assert doc["ok"] is True and doc["command"] == "check"
    got = {c["name"]: c["status"] for c in doc["result"]["checks"]}
    assert got["storage storage python3"] == "ok" and got["storage storage security.capability"] == "ok"
    assert got["openqrm"] == "ok"
