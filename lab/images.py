"""Lab images, built here and never pulled: a debootstrap base (`docker import`) and one image per host.

Each tag carries a hash of its recipe, so an image is rebuilt only when what it is made from changes.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import docker
import docker.errors

from .paths import IMAGES, REPO, state_dir

# openqrm: the real openQRM 5.3.60 server; openqrm-mock: the mock, only for faults a real server cannot make.
ROLES = ("storage", "source", "openqrm", "openqrm-mock")
BASE_REPO = "qrmfs-lab-base"
# The openQRM server code the `openqrm` image is built from (read-only, beside the checkout; see PROVENANCE.md).
OPENQRM_SRC_ENV = "QRMFS_OPENQRM_SRC"
OPENQRM_SRC_DIR = "openqrm-5.3.60"


class LabError(RuntimeError):
    """A lab step failed; the message says which and why."""


def _hash_files(paths: list[Path], extra: str = "", root: Path = IMAGES) -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def openqrm_src() -> Path:
    """The openQRM 5.3.60 tree: $QRMFS_OPENQRM_SRC, else ../shared/openqrm-5.3.60 beside the checkout."""
    env = os.environ.get(OPENQRM_SRC_ENV)
    src = Path(env) if env else REPO.parent / "shared" / OPENQRM_SRC_DIR
    if not (src / "PROVENANCE.md").is_file() or not (src / "src" / "web" / "base").is_dir():
        raise LabError(f"the openQRM 5.3.60 server code is not at {src} (the lab's openqrm image is built from "
                       f"it; set ${OPENQRM_SRC_ENV} to where it is)")
    return src


def base_tag() -> str:
    recipe = IMAGES / "base" / "recipe.json"
    return f"{BASE_REPO}:{_hash_files([recipe], 'base-v1')}"


def host_tag(role: str) -> str:
    files = [p for d in (IMAGES / role, IMAGES / "common") for p in d.rglob("*") if p.is_file()]
    extra = base_tag()
    if role == "openqrm":  # the image holds the openQRM tree: its content is part of the tag
        src = openqrm_src()
        extra += _hash_files([p for p in src.rglob("*") if p.is_file()], OPENQRM_SRC_DIR, root=src)
    return f"qrmfs-lab-{role}:{_hash_files(files, extra)}"


def _exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _log(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def debootstrap_argv(recipe: dict[str, Any], root: Path) -> list[str]:
    """debootstrap's argv for a recipe (suite, variant, include, optional exclude); no mirror argument:
    its default is the Debian archive this machine reaches."""
    argv = ["debootstrap", f"--variant={recipe['variant']}", "--include=" + ",".join(recipe["include"])]
    if recipe.get("exclude"):
        argv.append("--exclude=" + ",".join(recipe["exclude"]))
    return [*argv, recipe["suite"], str(root)]


def debootstrap(recipe: dict[str, Any], root: Path) -> None:
    """A Debian tree at `root` (which must not exist), without apt's package cache and lists."""
    r = subprocess.run(debootstrap_argv(recipe, root), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        tail = "\n".join((r.stdout + r.stderr).splitlines()[-15:])
        raise LabError(f"debootstrap of {recipe['suite']} failed (exit {r.returncode}):\n{tail}")
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for p in (root / junk).glob("*"):
            if p.is_file():
                p.unlink()


def docker_import(root: Path, tag: str) -> None:
    tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
    imp = subprocess.run(["docker", "import", "-", tag], stdin=tar.stdout, capture_output=True, text=True)
    assert tar.stdout is not None
    tar.stdout.close()
    if tar.wait() != 0 or imp.returncode != 0:
        raise LabError(f"docker import of {tag} failed: {imp.stderr.strip()}")


def build_base(client: docker.DockerClient) -> str:
    tag = base_tag()
    if _exists(client, tag):
        return tag
    recipe = json.loads((IMAGES / "base" / "recipe.json").read_text())
    _log(f"building base image {tag} with debootstrap (about a minute, once)")
    with tempfile.TemporaryDirectory(prefix="qrmfs-lab-base-") as tmp:
        root = Path(tmp) / "root"
        debootstrap(recipe, root)
        docker_import(root, tag)
    return tag


def build_host(client: docker.DockerClient, role: str) -> str:
    tag = host_tag(role)
    if _exists(client, tag):
        return tag
    base = build_base(client)
    _log(f"building image {tag}" + (" (apache2, PHP, MariaDB: a few minutes, once)" if role == "openqrm" else ""))
    if role != "openqrm":
        _docker_build(client, IMAGES, f"{role}/Dockerfile", tag, base)
        return tag
    # The build context: lab/images plus the openQRM tree (outside the checkout), copied verbatim.
    src = openqrm_src()
    with tempfile.TemporaryDirectory(prefix="qrmfs-lab-openqrm-") as tmp:
        ctx = Path(tmp) / "ctx"
        shutil.copytree(IMAGES, ctx, symlinks=True)
        shutil.copytree(src, ctx / OPENQRM_SRC_DIR, symlinks=True)
        _docker_build(client, ctx, "openqrm/Dockerfile", tag, base)
    return tag


def _docker_build(client: docker.DockerClient, context: Path, dockerfile: str, tag: str, base: str) -> None:
    try:
        client.images.build(path=str(context), dockerfile=dockerfile, tag=tag,
                            buildargs={"BASE": base}, rm=True, forcerm=True, pull=False)
    except docker.errors.BuildError as e:
        tail = "".join(str(x.get("stream", x.get("error", ""))) for x in list(e.build_log)[-15:])
        raise LabError(f"building {tag} failed: {e.msg}\n{tail}") from e


@contextmanager
def building() -> Iterator[None]:
    """One image builder at a time on this machine (parallel test workers start their labs together): the
    second waits, then finds the images the first built."""
    d = state_dir()
    d.mkdir(parents=True, exist_ok=True)
    with open(d / ".images.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def build_all(client: docker.DockerClient) -> dict[str, str]:
    with building():
        return {role: build_host(client, role) for role in ROLES}


# ---------------------------------------------------------------------------------------------------------
# More sources, on demand: each a debootstrap tree (lab/images/sources/NAME/recipe.json), kept under
# state_dir()/trees/ (the directory source of the tests is such a tree), imported as a docker image and
# finished by lab/images/sources/Dockerfile.

SOURCES = IMAGES / "sources"


def source_names() -> list[str]:
    return sorted(p.parent.name for p in SOURCES.glob("*/recipe.json"))


def source_recipe(name: str) -> dict[str, Any]:
    path = SOURCES / name / "recipe.json"
    if name not in source_names():
        raise LabError(f"no lab source {name!r} (known: {', '.join(source_names())})")
    recipe: dict[str, Any] = json.loads(path.read_text())
    return recipe


def tree_hash(name: str) -> str:
    return _hash_files([SOURCES / name / "recipe.json"], "tree-v1")


def ensure_tree(name: str) -> Path:
    """The debootstrap tree of source `name`, built once per recipe (about 45 s) and kept: an operator's
    chroot directory. Built under a temporary name and renamed, so a half-built tree is never used."""
    recipe = source_recipe(name)
    trees = state_dir() / "trees"
    trees.mkdir(parents=True, exist_ok=True)
    final = trees / f"{name}-{tree_hash(name)}"
    with open(trees / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (final / "etc" / "os-release").exists() or (final / "usr" / "lib" / "os-release").exists():
            return final
        _log(f"debootstrap of source {name} ({recipe['suite']}, about a minute, once)")
        with tempfile.TemporaryDirectory(dir=trees, prefix=f".{name}-") as tmp:
            root = Path(tmp) / "root"
            debootstrap(recipe, root)
            if final.exists():
                shutil.rmtree(final)
            root.rename(final)
        for old in trees.glob(f"{name}-*"):
            if old != final and old.is_dir():
                shutil.rmtree(old, ignore_errors=True)
    return final


def source_tag(name: str) -> str:
    files = [SOURCES / "Dockerfile", SOURCES / "setup.sh", SOURCES / "entrypoint.sh",
             IMAGES / "common" / "sshd_lab.conf"]
    return f"qrmfs-lab-src-{name}:{_hash_files(files, tree_hash(name))}"


def build_source(client: docker.DockerClient, name: str) -> str:
    tag = source_tag(name)
    if _exists(client, tag):
        return tag
    with building():
        return _build_source(client, name, tag)


def _build_source(client: docker.DockerClient, name: str, tag: str) -> str:
    if _exists(client, tag):
        return tag
    base = f"qrmfs-lab-tree-{name}:{tree_hash(name)}"
    if not _exists(client, base):
        docker_import(ensure_tree(name), base)
    _log(f"building image {tag}")
    _docker_build(client, IMAGES, "sources/Dockerfile", tag, base)
    return tag
