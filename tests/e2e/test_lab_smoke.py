"""The lab's services are real: NFS serves what ssh wrote, sshd accepts the lab key, the openQRM mock stores."""

from __future__ import annotations

import os
import subprocess
import uuid

import pytest

from lab import exports
from lab import lab as _lab

pytestmark = pytest.mark.e2e


@pytest.mark.parametrize("version", [4, 3])
def test_file_written_over_ssh_is_readable_over_nfs(lab, on_storage, version):
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    payload = f"written over ssh as {name}\n"
    on_storage(f"mkdir -p /exports/{name} && cat > /exports/{name}/hello.txt", input=payload.encode())
    try:
        base = f"nfs://{lab['hosts']['storage']['address']}/exports/{name}"
        ls = subprocess.run(["nfs-ls", f"{base}?version={version}"], capture_output=True, text=True, timeout=30)
        assert ls.returncode == 0, ls.stderr
        assert "hello.txt" in ls.stdout
        cat = subprocess.run(["nfs-cat", f"{base}/hello.txt?version={version}"], capture_output=True, text=True,
                             timeout=30)
        assert cat.returncode == 0, cat.stderr
        assert cat.stdout == payload
    finally:
        on_storage(f"rm -rf /exports/{name}")


def test_ssh_to_source_with_lab_key(lab, on_source):
    r = on_source("cat /etc/debian_version; test -x /lib/systemd/systemd && test -f /etc/inittab && echo ok")
    assert r.stdout.decode().strip().endswith("ok")


def test_ssh_refuses_an_unknown_host_key(lab, tmp_path):
    """known_hosts pins each host: the storage key presented under the source's address is refused."""
    storage_key = open(f"{lab['state_dir']}/hosts/storage/ssh_host_ed25519_key.pub").read().split()[:2]
    wrong = tmp_path / "known_hosts"
    wrong.write_text(f"{lab['hosts']['source']['address']} {storage_key[0]} {storage_key[1]}\n")
    argv = _lab.ssh_argv(lab, "source")
    argv[argv.index(f"UserKnownHostsFile={lab['ssh']['known_hosts']}")] = f"UserKnownHostsFile={wrong}"
    r = subprocess.run([*argv, "true"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 255
    assert "host key" in r.stderr.lower()


def test_event_sent_to_mock_appears_in_state(lab, mock):
    r = mock.get("/openqrm/action/resource-monitor.php", params={
        "resource_command": "post_event", "resource_id": "0", "event_name": "smoke",
        "event_priority": "9", "event_source": "qrmfs-test", "event_description": "hello"})
    assert r.status_code == 200
    events = mock.get("/_mock/state").json()["events"]
    assert [(e["event_name"], e["event_priority"], e["event_description"]) for e in events] == [
        ("smoke", "9", "hello")]


def test_new_image_needs_credentials(lab, mock):
    params = {"image_command": "new_image", "image_name": "smoke_img", "image_type": "1"}
    url = "/openqrm/base/server/image/image-action.php"

    def names() -> list[str]:
        return [i["image_name"] for i in mock.get("/_mock/state").json()["images"]]

    assert mock.get(url, params=params).status_code == 401
    assert names() == ["openqrm", "idle"]
    ok = mock.get(url, params=params, auth=(lab["openqrm"]["user"], lab["openqrm"]["password"]))
    assert ok.status_code == 200
    images = mock.get("/_mock/state").json()["images"]
    assert [(i["image_name"], i["image_type"]) for i in images[2:]] == [("smoke_img", "ram")]  # deployment id 1
    import base64

    creds = base64.b64encode(f"{lab['openqrm']['user']}:{lab['openqrm']['password']}".encode()).decode()
    assert creds not in mock.get("/_mock/state").text


def test_up_is_idempotent_and_down_leaves_nothing(lab):
    """A second, separately named lab: up twice reuses, down removes every container, network, volume."""
    import docker

    name = f"qrmfs-labtest-{uuid.uuid4().hex[:6]}"
    client = docker.from_env()
    try:
        first = _lab.up(name)
        second = _lab.up(name)
        assert {r: h["container_id"] for r, h in first["hosts"].items()} == \
               {r: h["container_id"] for r, h in second["hosts"].items()}
        assert _lab.status(name) is not None
    finally:
        removed = _lab.down(name)
    assert any(r.startswith("container ") for r in removed)
    flt = {"label": f"{_lab.LABEL}={name}"}
    assert client.containers.list(all=True, filters=flt) == []
    assert client.networks.list(filters=flt) == []
    assert client.volumes.list(filters=flt) == []
    assert _lab.status(name) is None
    state = _lab.LabHandle(name).state
    assert not os.path.ismount(exports.mount_point(state)) and not exports.image_file(state).exists()


def test_xfs_export_serves_reflinks_and_a_crash_leftover_is_cleaned(lab, on_storage):
    """/exports is XFS with reflinks (shared blocks), /exports-plain ext4; both are served over NFS. A loop
    mount left by a crash (mounted, no containers) is unmounted and detached by the next `up`."""
    if lab["hosts"]["storage"]["export_kind"] != "xfs":
        pytest.skip("this lab's /exports is a plain volume")
    assert lab["hosts"]["storage"]["exports"] == {"/exports": "xfs", "/exports-plain": "ext4"}
    fs = on_storage("stat -f -c %T /exports /exports-plain").stdout.decode().split()
    assert fs == ["xfs", "ext2/ext3"]
    name = f"reflink_{uuid.uuid4().hex[:8]}"
    try:
        # 64 MiB, reflinked: the export loses (almost) no space, and the copy is independent of the original
        out = on_storage(f"cd /exports && head -c 64M /dev/urandom > {name}.a && sync && "
                         f"a=$(stat -f -c %f .) && cp --reflink=always {name}.a {name}.b && sync && "
                         f"b=$(stat -f -c %f .) && echo $(( (a - b) * $(stat -f -c %S .) )) && "
                         f"echo x >> {name}.b && cmp -s {name}.a {name}.b; echo cmp=$?").stdout.decode().split()
        assert int(out[0]) < 1 << 20 and out[1] == "cmp=1"
        plain = on_storage(f"cd /exports-plain && echo x > {name}.c && cp --reflink=always {name}.c {name}.d",
                           check=False)
        assert plain.returncode != 0, "ext4 has no reflinks: /exports-plain is the plain kind"
        for root in ("/exports", "/exports-plain"):
            r = subprocess.run(["nfs-ls", f"nfs://{lab['hosts']['storage']['address']}{root}?version=4"],
                               capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stderr
    finally:
        on_storage(f"rm -f /exports/{name}.a /exports/{name}.b /exports-plain/{name}.c /exports-plain/{name}.d")

    other = f"qrmfs-labtest-{uuid.uuid4().hex[:6]}"
    state = _lab.LabHandle(other).state
    # what a crash between `up` and `down` leaves: a mounted loop device, no lab
    (exports.prepare(state) / "leftover").write_text("from the crashed lab\n")
    try:
        info = _lab.up(other)
        assert info["hosts"]["storage"]["export_kind"] == "xfs"
        assert os.path.ismount(exports.mount_point(state))
        assert not (exports.mount_point(state) / "leftover").exists()  # a new file system, the old released
        loops = subprocess.run(["losetup", "-j", str(exports.image_file(state))], capture_output=True,
                               text=True).stdout.splitlines()
        assert len(loops) == 1, loops
    finally:
        _lab.down(other)
    assert not os.path.ismount(exports.mount_point(state)) and not exports.image_file(state).exists()
