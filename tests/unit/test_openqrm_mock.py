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


# --- events (event.class.php log() on MariaDB in strict mode) -------------------------------------

def user_images(client: httpx.Client) -> list[dict[str, Any]]:
    """image_info without openQRM's own records (openqrm, idle)."""
    return [i for i in state(client)["images"] if i["image_id"] not in ("0", "1")]


def test_event_is_stored_as_a_row_of_event_info(client: httpx.Client) -> None:
    before = int(time.time())
    r = post_event(client, event_name="qrmfs_build", event_priority=5, event_description="built img1")
    assert (r.status_code, r.text) == (200, "")
    (ev,) = state(client)["events"]
    assert int(ev["event_id"]) >= before * 10000  # a microtime id, as openQRM allocates them
    assert {k: v for k, v in ev.items() if k not in ("event_id", "event_time")} == {
        "event_name": "qrmfs_build", "event_priority": "5", "event_source": "qrmfs",
        "event_description": "built img1", "event_comment": "", "event_capabilities": "", "event_status": "0",
        "event_image_id": "0", "event_resource_id": "0"}
    assert before <= int(ev["event_time"]) <= int(time.time()) + 1


def test_priority_10_is_stored_as_5_and_turns_the_matching_9_into_5(client: httpx.Client) -> None:
    post_event(client, event_name="clone_img", event_priority=9, event_description="s")
    post_event(client, event_name="other", event_priority=9, event_description="s")
    post_event(client, event_name="clone_img", event_priority=9, event_source="else", event_description="s")
    post_event(client, event_name="clone_img", event_priority=10, event_description="e")
    events = state(client)["events"]
    assert [(e["event_name"], e["event_source"], e["event_priority"]) for e in events] == [
        ("clone_img", "qrmfs", "5"), ("other", "qrmfs", "9"), ("clone_img", "else", "9"), ("clone_img", "qrmfs", "5")]


def test_an_identical_event_only_gets_a_new_time(client: httpx.Client) -> None:
    for name, desc in (("e", "same"), ("e", "same"), ("E", "SAME  ")):  # utf8_general_ci, trailing spaces
        post_event(client, event_name=name, event_priority=5, event_description=desc)
    assert [e["event_description"] for e in state(client)["events"]] == ["same"]


@pytest.mark.parametrize("params", [
    {"event_name": "n" * 51},                     # event_name VARCHAR(50): refused in strict mode
    {"event_description": "it's"},                # the quote breaks the de-duplication query
    {"event_description": "d" * 254 + "\u00e9"},  # PHP cuts 255 bytes inside the character
    {"event_description": "\U0001F600"},          # utf8mb3 tables
    {"event_name": ""},                           # post_event needs event_name ...
    {"resource_id": ""},                          # ... and resource_id
])
def test_events_the_real_server_loses_are_lost(client: httpx.Client, params: dict[str, str]) -> None:
    r = post_event(client, **{"event_name": "x", "event_priority": 5, **params})
    assert r.status_code == 200
    assert state(client)["events"] == []


def test_descriptions_are_cut_at_255_and_tags_filtered(client: httpx.Client) -> None:
    post_event(client, event_name="x", event_priority=5, event_description="d" * 300)
    post_event(client, event_name="y", event_priority=5, event_description="a <abc> b <x:y> c")
    assert [e["event_description"] for e in state(client)["events"]] == ["d" * 255, "a  b  c"]


def test_a_priority_outside_0_to_10_is_stored_then_500_and_none_is_lost_with_500(client: httpx.Client) -> None:
    assert post_event(client, event_name="x", event_priority=99).status_code == 500
    assert post_event(client, event_name="y", event_priority="").status_code == 500
    assert [e["event_name"] for e in state(client)["events"]] == ["x"]


# --- images (image-action.php) ------------------------------------------------------------------

NEW: dict[str, Any] = {
    "image_command": "new_image",
    "image_name": "img1",
    "image_type": "2",  # a deployment id (see DEPLOYMENT)
    "image_rootdevice": "/exports/img1",
    "image_rootfstype": "nfs",
    "image_storageid": "17964779222587",
    "image_isshared": "0",
    "image_comment": "built by qrmfs",
    "image_capabilities": "",
}
DEPLOYMENT = {"deployment_id": "2", "deployment_name": "nfs-deployment", "deployment_type": "nfs-deployment",
              "deployment_description": "Nfs-root deployment", "deployment_storagetype": "nfs-storage",
              "deployment_storagedescription": "NFS Storage", "deployment_mapping": ""}


@pytest.fixture
def nfs(client: httpx.Client) -> httpx.Client:
    """The mock with the nfs-deployment type registered (id 2)."""
    deps = state(client)["deployments"]
    assert client.post("/_mock/state", json={"deployments": [*deps, DEPLOYMENT]}).status_code == 200
    return client


def test_new_image_without_auth_is_401_and_nothing_else_is(client: httpx.Client) -> None:
    r = image(client, auth=None, **NEW)
    assert r.status_code == 401
    assert r.headers["WWW-Authenticate"] == 'Basic realm="openQRM-Server Login"'
    assert image(client, auth=("openqrm", "wrong"), **NEW).status_code == 401
    assert image(client, auth=("nobody", "openqrm"), **NEW).status_code == 401
    assert user_images(client) == [] and state(client)["events"] == []


def test_a_user_who_is_not_an_administrator_gets_200_and_only_an_event(client: httpx.Client) -> None:
    assert image(client, auth=VIEWER, **NEW).status_code == 200
    assert user_images(client) == []
    assert [(e["event_name"], e["event_priority"], e["event_description"]) for e in state(client)["events"]] == [
        ("authorization", "1", "Un-Authorized access to image-actions from viewer")]


def test_new_image_reads_the_type_as_a_deployment_id(nfs: httpx.Client) -> None:
    r = image(nfs, **NEW)
    assert (r.status_code, r.text) == (200, "\n")
    img = user_images(nfs)[0]
    assert img["image_type"] == "nfs-deployment" and img["image_isactive"] == "0"
    assert img["image_storageid"] == "17964779222587" and int(img["image_id"]) > 10**12
    image(nfs, **{**NEW, "image_name": "img2", "image_type": "nfs-deployment", "image_storageid": ""})
    image(nfs, **{**NEW, "image_name": "img3", "image_type": "4711", "image_storageid": "abc"})
    assert [(i["image_name"], i["image_type"], i["image_storageid"]) for i in user_images(nfs)[1:]] == [
        ("img2", "", "0"), ("img3", "", "0")]
    assert [e["event_description"] for e in state(nfs)["events"]] == [
        f"Processing image new_image on Image {n}" for n in ("img1", "img2", "img3")]


def test_duplicate_name_is_stored_twice_and_removed_by_name_together(client: httpx.Client) -> None:
    image(client, **NEW)
    image(client, **NEW)
    assert [i["image_name"] for i in user_images(client)] == ["img1", "img1"]
    assert image(client, image_command="remove_by_name", image_name="IMG1").status_code == 200
    assert user_images(client) == []
    assert image(client, image_command="remove_by_name", image_name="img1").status_code == 200  # never 404


def test_remove_by_name_keeps_openqrm_and_idle(client: httpx.Client) -> None:
    for name in ("idle", "openqrm"):
        image(client, image_command="remove_by_name", image_name=name)
    assert [i["image_name"] for i in state(client)["images"]] == ["openqrm", "idle"]


def test_a_row_too_long_for_strict_mode_is_not_stored(client: httpx.Client) -> None:
    assert image(client, **{**NEW, "image_comment": "c" * 256}).status_code == 200
    assert user_images(client) == []
    assert ("add", "2", "Failed adding new image to database") in [
        (e["event_name"], e["event_priority"], e["event_description"]) for e in state(client)["events"]]


def test_update_image_and_remove_by_id(client: httpx.Client) -> None:
    image(client, **NEW)
    iid = user_images(client)[0]["image_id"]
    assert image(client, image_command="update_image", image_id=iid, image_comment="changed").status_code == 200
    (img,) = user_images(client)
    assert (img["image_comment"], img["image_rootdevice"], img["image_isshared"]) == (
        "changed", "/exports/img1", "0")
    assert image(client, image_command="update_image", image_id=99, image_comment="x").status_code == 200
    assert image(client, image_command="remove", image_id=99).status_code == 200
    assert image(client, image_command="remove", image_id=iid).status_code == 200
    assert user_images(client) == []


def test_unknown_image_command_is_200_with_a_priority_3_event(client: httpx.Client) -> None:
    assert image(client, image_command="frobnicate").status_code == 200
    assert ("frobnicate", "3", "No such image command (frobnicate)") in [
        (e["event_name"], e["event_priority"], e["event_description"]) for e in state(client)["events"]]


def test_deployment_types_are_added_with_a_server_id_and_removed_by_type(client: httpx.Client) -> None:
    image(client, image_command="add_deployment_type", deployment_name="nfs-deployment",
          deployment_type="nfs-deployment", deployment_storagetype="nfs-storage")
    (dep,) = [d for d in state(client)["deployments"] if d["deployment_type"] == "nfs-deployment"]
    assert int(dep["deployment_id"]) > 10**12
    image(client, image_command="remove_deployment_type", deployment_name="nfs-deployment")
    assert [d["deployment_type"] for d in state(client)["deployments"]] == ["ram"]


def test_the_role_probe_is_500_for_an_administrator_and_changes_nothing(client: httpx.Client) -> None:
    probe = {"action": "add", "identifier[]": "0", "image_storageid[]": "0"}  # qrmfs's role probe
    assert image(client, **probe).status_code == 500
    assert state(client)["events"] == [] and user_images(client) == []
    assert image(client, auth=VIEWER, **probe).status_code == 200  # stopped at the role check


def test_state_can_be_loaded_only_as_full_rows(client: httpx.Client) -> None:
    assert client.post("/_mock/state", json={"images": [{"image_id": "5"}]}).status_code == 400
    assert client.post("/_mock/state", json={"users": []}).status_code == 400


def test_other_paths(client: httpx.Client) -> None:
    assert client.get("/openqrm/base/server/storage/storage-action.php").status_code == 401
    assert client.get("/openqrm/base/server/storage/storage-action.php", auth=ADMIN).status_code == 404
    assert client.get("/openqrm/nothing").status_code == 404
    assert client.get("/elsewhere").status_code == 404


def test_storage_default_record(client: httpx.Client) -> None:
    (st,) = state(client)["storage"]
    assert st["storage_id"] == 1
    assert st["storage_name"] == "storage"


# --- requests log -------------------------------------------------------------------------------

def test_requests_are_recorded_without_passwords(client: httpx.Client) -> None:
    image(client, auth=None, **NEW)
    image(client, auth=VIEWER, **NEW)
    image(client, auth=ADMIN, **NEW)
    post_event(client, event_name="e", event_priority=5)
    reqs = state(client)["requests"]
    assert [(r["method"], r["path"], r["status"], r["authorized_user"]) for r in reqs] == [
        ("GET", IMAGE, 401, None),
        ("GET", IMAGE, 200, "viewer"),
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
    assert user_images(client) == []  # faulted request changed nothing
    assert client.get("/_mock/fault").json()["mode"] == "ok"
    assert image(client, **NEW).status_code == 200
    st = state(client)
    assert [r["status"] for r in st["requests"]] == [500, 200]
    assert [i["image_name"] for i in user_images(client)] == ["img1"]


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
    assert user_images(client) == []
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
    assert st["events"] == [] and st["requests"] == []
    assert [i["image_name"] for i in st["images"]] == ["openqrm", "idle"]  # a new install's tables
    assert [d["deployment_type"] for d in st["deployments"]] == ["ram"]
    assert len(st["storage"]) == 1
    assert client.get("/_mock/fault").json() == {"mode": "ok", "count": None, "path": None}


def test_mock_uses_only_the_standard_library() -> None:
    tree = ast.parse(MOCK.read_text())
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules.add(node.module.split(".")[0])
    assert modules - set(sys.stdlib_module_names) - {"__future__"} == set()
