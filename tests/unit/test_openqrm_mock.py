"""Tests for the lab's mock openQRM server (lab/images/openqrm-mock/mock.py), run as a subprocess."""

from __future__ import annotations

import ast
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

MOCK = Path(__file__).resolve().parents[2] / "lab" / "images" / "openqrm-mock" / "mock.py"
EVENT = "/openqrm/action/resource-monitor.php"
IMAGE = "/openqrm/base/server/image/image-action.php"
ADMIN = ("openqrm", "openqrm")
VIEWER = ("viewer", "viewer")
STARTUP_DEADLINE = 15.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def base_url() -> Iterator[str]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOCK_")}
    env["MOCK_HANG_TIMEOUT"] = "30"  # a bug in the release path must not stall the suite for 600 s
    proc = subprocess.Popen(
        [sys.executable, str(MOCK), "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_DEADLINE
    try:
        while True:
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"mock exited early with {proc.returncode}: {err}")
            try:
                if httpx.get(f"{url}/_mock/health", timeout=1.0).text == "ok":
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mock did not become healthy in time")
            time.sleep(0.05)
        # drain stderr in the background so the pipe never fills up
        drain = ThreadPoolExecutor(max_workers=1)
        drain.submit(lambda: proc.stderr.read() if proc.stderr else b"")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture
def client(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, timeout=10.0) as c:
        assert c.post("/_mock/reset").status_code == 200
        yield c
        c.delete("/_mock/fault")


def state(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/_mock/state")
    assert r.status_code == 200
    return r.json()


def post_event(client: httpx.Client, **params: Any) -> httpx.Response:
    q = {"resource_command": "post_event", "resource_id": 0, "event_source": "qrmfs",
         "event_description": "d", **params}
    return client.get(EVENT, params=q)


def image(client: httpx.Client, auth: tuple[str, str] | None = ADMIN, **params: Any) -> httpx.Response:
    return client.get(IMAGE, params=params, auth=auth)


# --- events -------------------------------------------------------------------------------------

def test_event_is_stored(client: httpx.Client) -> None:
    before = int(time.time())
    r = post_event(client, event_name="qrmfs_build", event_priority=5, event_description="built img1")
    assert r.status_code == 200
    assert "<html" in r.text.lower()
    (ev,) = state(client)["events"]
    assert ev["event_id"] == 1
    assert ev["event_name"] == "qrmfs_build"
    assert ev["event_priority"] == 5
    assert ev["event_source"] == "qrmfs"
    assert ev["event_description"] == "built img1"
    assert ev["resource_id"] == 0
    assert before <= ev["event_time"] <= int(time.time()) + 1


def test_priority_10_turns_matching_9_into_5(client: httpx.Client) -> None:
    assert post_event(client, event_name="clone_img", event_priority=9).status_code == 200
    assert post_event(client, event_name="other", event_priority=9).status_code == 200
    r = post_event(client, event_name="clone_img", event_priority=9, event_source="else")
    assert r.status_code == 200
    assert post_event(client, event_name="clone_img", event_priority=10).status_code == 200
    events = state(client)["events"]
    assert [(e["event_id"], e["event_name"], e["event_source"], e["event_priority"]) for e in events] == [
        (1, "clone_img", "qrmfs", 5),
        (2, "other", "qrmfs", 9),
        (3, "clone_img", "else", 9),
        (4, "clone_img", "qrmfs", 10),
    ]


@pytest.mark.parametrize(
    "params",
    [
        {"resource_command": "post_event", "event_priority": "5"},  # no event_name
        {"resource_command": "post_event", "event_name": "x", "event_priority": "high"},
        {"resource_command": "get_event", "event_name": "x", "event_priority": "5"},
        {"event_name": "x", "event_priority": "5"},
    ],
)
def test_invalid_event_is_400(client: httpx.Client, params: dict[str, str]) -> None:
    assert client.get(EVENT, params=params).status_code == 400
    assert state(client)["events"] == []


# --- images -------------------------------------------------------------------------------------

NEW: dict[str, Any] = {
    "image_command": "new_image",
    "image_name": "img1",
    "image_type": "nfs-deployment",
    "image_rootdevice": "/exports/img1",
    "image_rootfstype": "nfs",
    "image_storageid": "1",
    "image_isshared": "0",
    "image_comment": "built by qrmfs",
    "image_capabilities": "",
    "image_deployment_parameter": 'IMAGE_NFS_MOUNT_OPTIONS="ro"',
}


def test_new_image_without_auth_is_401(client: httpx.Client) -> None:
    r = image(client, auth=None, **NEW)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="openQRM"'
    assert image(client, auth=("openqrm", "wrong"), **NEW).status_code == 401
    assert image(client, auth=("nobody", "openqrm"), **NEW).status_code == 401
    assert state(client)["images"] == []


def test_new_image_as_viewer_is_403(client: httpx.Client) -> None:
    assert image(client, auth=VIEWER, **NEW).status_code == 403
    assert state(client)["images"] == []


def test_new_image_as_admin_is_stored(client: httpx.Client) -> None:
    r = image(client, **NEW)
    assert r.status_code == 200
    (img,) = state(client)["images"]
    expected = {k: v for k, v in NEW.items() if k != "image_command"}
    assert img == {"image_id": 1, **expected}
    assert image(client, **{**NEW, "image_name": "img2"}).status_code == 200
    assert [i["image_id"] for i in state(client)["images"]] == [1, 2]


@pytest.mark.parametrize("name", ["", "has-dash", "a" * 51, "sp ace", "dot.ted"])
def test_new_image_bad_name_is_400(client: httpx.Client, name: str) -> None:
    assert image(client, **{**NEW, "image_name": name}).status_code == 400
    assert state(client)["images"] == []


def test_new_image_missing_name_is_400(client: httpx.Client) -> None:
    params = {k: v for k, v in NEW.items() if k != "image_name"}
    assert image(client, **params).status_code == 400


def test_duplicate_name_is_stored_twice(client: httpx.Client) -> None:
    assert image(client, **NEW).status_code == 200
    assert image(client, **NEW).status_code == 200
    images = state(client)["images"]
    assert [(i["image_id"], i["image_name"]) for i in images] == [(1, "img1"), (2, "img1")]


def test_update_image(client: httpx.Client) -> None:
    assert image(client, **NEW).status_code == 200
    r = image(client, image_command="update_image", image_id=1, image_comment="changed")
    assert r.status_code == 200
    (img,) = state(client)["images"]
    assert img["image_comment"] == "changed"
    assert img["image_rootdevice"] == "/exports/img1"
    assert img["image_id"] == 1
    assert image(client, image_command="update_image", image_id=99, image_comment="x").status_code == 404
    assert image(client, auth=VIEWER, image_command="update_image", image_id=1).status_code == 403


def test_remove(client: httpx.Client) -> None:
    assert image(client, **NEW).status_code == 200
    assert image(client, **{**NEW, "image_name": "img2"}).status_code == 200
    assert image(client, image_command="remove", image_id=1).status_code == 200
    assert [i["image_id"] for i in state(client)["images"]] == [2]
    assert image(client, image_command="remove", image_id=1).status_code == 404


def test_remove_by_name(client: httpx.Client) -> None:
    for name in ("img1", "img1", "img2"):
        assert image(client, **{**NEW, "image_name": name}).status_code == 200
    assert image(client, image_command="remove_by_name", image_name="img1").status_code == 200
    assert [(i["image_id"], i["image_name"]) for i in state(client)["images"]] == [(3, "img2")]
    assert image(client, image_command="remove_by_name", image_name="img1").status_code == 404


def test_unknown_image_command_is_400(client: httpx.Client) -> None:
    assert image(client, image_command="frobnicate").status_code == 400


def test_other_paths(client: httpx.Client) -> None:
    assert client.get("/openqrm/base/server/storage/storage-action.php").status_code == 401
    assert client.get("/openqrm/base/server/storage/storage-action.php", auth=ADMIN).status_code == 404
    assert client.get("/openqrm/nothing").status_code == 404
    assert client.get("/elsewhere").status_code == 404


def test_storage_default_record(client: httpx.Client) -> None:
    (st,) = state(client)["storage"]
    assert st["storage_id"] == 1
    assert st["storage_name"] == "storage"
    assert st["storage_type"] == "nfs-storage"


# --- requests log -------------------------------------------------------------------------------

def test_requests_are_recorded_without_passwords(client: httpx.Client) -> None:
    image(client, auth=None, **NEW)
    image(client, auth=VIEWER, **NEW)
    image(client, auth=ADMIN, **NEW)
    post_event(client, event_name="e", event_priority=5)
    reqs = state(client)["requests"]
    assert [(r["method"], r["path"], r["status"], r["authorized_user"]) for r in reqs] == [
        ("GET", IMAGE, 401, None),
        ("GET", IMAGE, 403, "viewer"),
        ("GET", IMAGE, 200, "openqrm"),
        ("GET", EVENT, 200, None),
    ]
    assert reqs[2]["query"]["image_name"] == "img1"
    raw = client.get("/_mock/state").text
    assert "Authorization" not in raw
    assert "Basic " not in raw
    # the only password strings in play: none may appear except as part of the user name "openqrm"
    assert "viewer:viewer" not in raw
    assert "openqrm:openqrm" not in raw
    for r in reqs:
        assert set(r) == {"method", "path", "query", "status", "authorized_user"}
        assert not any("pass" in k.lower() or "auth" in k.lower() for k in r["query"])


# --- faults -------------------------------------------------------------------------------------

def test_fault_500_with_count_then_ok(client: httpx.Client) -> None:
    r = client.post("/_mock/fault", json={"mode": "500", "count": 1})
    assert r.status_code == 200
    assert image(client, **NEW).status_code == 500
    assert state(client)["images"] == []  # faulted request changed nothing
    assert client.get("/_mock/fault").json()["mode"] == "ok"
    assert image(client, **NEW).status_code == 200
    st = state(client)
    assert [r["status"] for r in st["requests"]] == [500, 200]
    assert [i["image_id"] for i in st["images"]] == [1]


def test_fault_path_filter(client: httpx.Client) -> None:
    assert client.post("/_mock/fault", json={"mode": "500", "path": "image-action"}).status_code == 200
    assert post_event(client, event_name="e", event_priority=5).status_code == 200
    assert image(client, **NEW).status_code == 500
    assert image(client, **NEW).status_code == 500  # no count: stays until changed
    assert client.delete("/_mock/fault").status_code == 200
    assert image(client, **NEW).status_code == 200


def test_fault_close(client: httpx.Client) -> None:
    assert client.post("/_mock/fault", json={"mode": "close", "count": 1}).status_code == 200
    with pytest.raises(httpx.TransportError):
        post_event(client, event_name="e", event_priority=5)
    assert state(client)["events"] == []
    assert post_event(client, event_name="e", event_priority=5).status_code == 200
    st = state(client)
    assert [r["status"] for r in st["requests"]] == ["close", 200]
    assert len(st["events"]) == 1


def test_fault_hang_released_by_delete(client: httpx.Client, base_url: str) -> None:
    assert client.post("/_mock/fault", json={"mode": "hang"}).status_code == 200

    def hung_request() -> httpx.Response:
        with httpx.Client(base_url=base_url, timeout=20.0) as c:
            return image(c, **NEW)

    with ThreadPoolExecutor(max_workers=1) as pool:
        fut = pool.submit(hung_request)
        deadline = time.monotonic() + 10
        while True:  # the control interface stays responsive while a request hangs
            if [r["status"] for r in state(client)["requests"]] == ["hang"]:
                break
            assert time.monotonic() < deadline, "hung request was never recorded"
            time.sleep(0.05)
        assert not fut.done()
        assert client.get("/_mock/health").text == "ok"
        assert client.delete("/_mock/fault").status_code == 200
        r = fut.result(timeout=10)
    assert r.status_code == 503
    assert state(client)["images"] == []
    assert image(client, **NEW).status_code == 200


@pytest.mark.parametrize(
    "body",
    [{"mode": "explode"}, {"mode": "500", "count": 0}, {"mode": "500", "count": "2"}, {"count": 1}],
)
def test_fault_bad_body_is_400(client: httpx.Client, body: dict[str, Any]) -> None:
    assert client.post("/_mock/fault", json=body).status_code == 400


# --- reset / misc -------------------------------------------------------------------------------

def test_reset(client: httpx.Client) -> None:
    post_event(client, event_name="e", event_priority=5)
    image(client, **NEW)
    client.post("/_mock/fault", json={"mode": "500"})
    assert client.post("/_mock/reset").status_code == 200
    st = state(client)
    assert st["events"] == [] and st["images"] == [] and st["requests"] == []
    assert len(st["storage"]) == 1
    assert client.get("/_mock/fault").json() == {"mode": "ok", "count": None, "path": None}
    assert image(client, **NEW).status_code == 200
    assert post_event(client, event_name="e", event_priority=5).status_code == 200
    st = state(client)
    assert st["images"][0]["image_id"] == 1
    assert st["events"][0]["event_id"] == 1


def test_mock_uses_only_the_standard_library() -> None:
    tree = ast.parse(MOCK.read_text())
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    assert modules - set(sys.stdlib_module_names) - {"__future__"} == set()
