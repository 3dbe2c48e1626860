"""Lab images, built here and never pulled: a debootstrap base (`docker import`) and one image per host.

Each tag carries a hash of its recipe, so an image is rebuilt only when what it is made from changes.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import docker
import docker.errors

from .paths import IMAGES

ROLES = ("storage", "source", "openqrm")
BASE_REPO = "qrmfs-lab-base"


class LabError(RuntimeError):
    """A lab step failed; the message says which and why."""


def _hash_files(paths: list[Path], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for p in sorted(paths):
        h.update(str(p.relative_to(IMAGES)).encode() + b"\0" + p.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def base_tag() -> str:
    recipe = IMAGES / "base" / "recipe.json"
    return f"{BASE_REPO}:{_hash_files([recipe], 'base-v1')}"


def host_tag(role: str) -> str:
    files = [p for d in (IMAGES / role, IMAGES / "common") for p in d.rglob("*") if p.is_file()]
    return f"qrmfs-lab-{role}:{_hash_files(files, base_tag())}"


def _exists(client: docker.DockerClient, tag: str) -> bool:
    try:
        client.images.get(tag)
        return True
    except docker.errors.ImageNotFound:
        return False


def _log(msg: str) -> None:
    print(f"lab: {msg}", file=sys.stderr, flush=True)


def build_base(client: docker.DockerClient) -> str:
    tag = base_tag()
    if _exists(client, tag):
        return tag
    recipe = json.loads((IMAGES / "base" / "recipe.json").read_text())
    _log(f"building base image {tag} with debootstrap (about a minute, once)")
    with tempfile.TemporaryDirectory(prefix="qrmfs-lab-base-") as tmp:
        root = Path(tmp) / "root"
        cmd = ["debootstrap", f"--variant={recipe['variant']}", "--include=" + ",".join(recipe["include"]),
               recipe["suite"], str(root)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            tail = "\n".join((r.stdout + r.stderr).splitlines()[-15:])
            raise LabError(f"debootstrap failed (exit {r.returncode}):\n{tail}")
        for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for p in (root / junk).glob("*"):
                if p.is_file():
                    p.unlink()
        tar = subprocess.Popen(["tar", "-C", str(root), "--numeric-owner", "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run(["docker", "import", "-", tag], stdin=tar.stdout, capture_output=True, text=True)
        assert tar.stdout is not None
        tar.stdout.close()
        if tar.wait() != 0 or imp.returncode != 0:
            raise LabError(f"docker import of the base image failed: {imp.stderr.strip()}")
    return tag


def build_host(client: docker.DockerClient, role: str) -> str:
    tag = host_tag(role)
    if _exists(client, tag):
        return tag
    base = build_base(client)
    _log(f"building image {tag}")
    try:
        client.images.build(path=str(IMAGES), dockerfile=f"{role}/Dockerfile", tag=tag,
                            buildargs={"BASE": base}, rm=True, forcerm=True, pull=False)
    except docker.errors.BuildError as e:
        tail = "".join(str(x.get("stream", x.get("error", ""))) for x in list(e.build_log)[-15:])
        raise LabError(f"building {tag} failed: {e.msg}\n{tail}") from e
    return tag


def build_all(client: docker.DockerClient) -> dict[str, str]:
    return {role: build_host(client, role) for role in ROLES}
