"""The lab's services are real: NFS serves what ssh wrote, sshd accepts the lab key, the mock stores."""

from __future__ import annotations

import subprocess
import uuid

import pytest

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
        ("smoke", 9, "hello")]


def test_new_image_needs_credentials(lab, mock):
    params = {"image_command": "new_image", "image_name": "smoke_img", "image_type": "nfs-deployment"}
    url = "/openqrm/base/server/image/image-action.php"
    assert mock.get(url, params=params).status_code == 401
    assert mock.get("/_mock/state").json()["images"] == []
    ok = mock.get(url, params=params, auth=(lab["openqrm"]["user"], lab["openqrm"]["password"]))
    assert ok.status_code == 200
    images = mock.get("/_mock/state").json()["images"]
    assert [(i["image_name"], i["image_type"]) for i in images] == [("smoke_img", "nfs-deployment")]
    import base64

    creds = base64.b64encode(f"{lab['openqrm']['user']}:{lab['openqrm']['password']}".encode()).decode()
    assert creds not in mock.get("/_mock/state").text


def test_storage_record_names_the_lab_storage(lab, mock):
    storage = mock.get("/_mock/state").json()["storage"]
    assert storage[0]["storage_name"] == "storage" and storage[0]["storage_id"] == 1


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
