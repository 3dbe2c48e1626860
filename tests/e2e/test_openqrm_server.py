"""The lab's openQRM is the real 5.3.60 server: its own PHP, schema and Basic auth, set up as an install is
(the nfs-storage plugin's deployment type, a storage record per storage server, an administrator and a user
who is not one), read back from its own database."""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest

from lab import lab as _lab

pytestmark = pytest.mark.e2e

IMAGE_ACTION = "/base/server/image/image-action.php"


def _get(lab: dict[str, Any], params: dict[str, str], auth: tuple[str, str] | None = None) -> httpx.Response:
    return httpx.get(lab["openqrm"]["url"] + IMAGE_ACTION, params=params, auth=auth, timeout=30)


def _admin(lab: dict[str, Any]) -> tuple[str, str]:
    return lab["openqrm"]["user"], lab["openqrm"]["password"]


def test_the_server_is_set_up_as_an_install_is(lab):
    oq = lab["openqrm"]
    dep = [d for d in _lab.deployments(lab["name"]) if d["deployment_type"] == "nfs-deployment"]
    assert [(d["deployment_id"], d["deployment_name"], d["deployment_storagetype"]) for d in dep] == [
        (str(oq["nfs_deployment_id"]), "nfs-deployment", "nfs-storage")]
    assert oq["nfs_deployment_id"] > 10**12  # allocated by the server (a microtime id), not chosen by the lab
    storages = {s["storage_name"]: s for s in _lab.storages(lab["name"])}
    resources = {r["resource_id"]: r for r in _lab.resources(lab["name"])}
    s = storages["storage"]
    assert int(str(s["storage_id"])) == oq["storage_ids"]["storage"]
    assert s["storage_type"] == str(oq["nfs_deployment_id"])
    assert resources[s["storage_resource_id"]]["resource_ip"] == lab["hosts"]["storage"]["address"]
    users = {u["user_name"]: u["user_role"] for u in _lab.openqrm_sql(lab["name"], "SELECT * FROM user_info")}
    roles = {r["role_id"]: r["role_name"] for r in _lab.openqrm_sql(lab["name"], "SELECT * FROM role_info")}
    assert roles[users["openqrm"]] == "administrator" and roles[users["viewer"]] == "readonly"
    # the lab's qrmfs config carries the server's id of the storage server
    cfg = open(lab["config"]).read()
    assert f"storage_id = {oq['storage_ids']['storage']}\n" in cfg


def test_basic_auth_is_apaches_and_an_administrator_registers_a_usable_record(lab):
    oq = lab["openqrm"]
    name = "srv_" + uuid.uuid4().hex[:8]
    params = {"image_command": "new_image", "image_name": name, "image_type": str(oq["nfs_deployment_id"]),
              "image_rootdevice": f"/exports/{name}", "image_rootfstype": "nfs",
              "image_storageid": str(oq["storage_ids"]["storage"])}
    r = _get(lab, params)
    assert r.status_code == 401 and "openQRM" in r.headers["www-authenticate"]
    assert _get(lab, params, auth=(oq["user"], "wrong")).status_code == 401
    assert [i for i in _lab.images(lab["name"]) if i["image_name"] == name] == []
    r = _get(lab, params, auth=_admin(lab))
    assert r.status_code == 200
    (rec,) = [i for i in _lab.images(lab["name"]) if i["image_name"] == name]
    assert (rec["image_type"], rec["image_rootdevice"], rec["image_storageid"]) == (
        "nfs-deployment", f"/exports/{name}", str(oq["storage_ids"]["storage"]))
    _get(lab, {"image_command": "remove_by_name", "image_name": name}, auth=_admin(lab)).raise_for_status()
    assert [i for i in _lab.images(lab["name"]) if i["image_name"] == name] == []


def test_a_user_who_is_not_an_administrator_gets_200_and_nothing_is_done(lab):
    viewer = lab["openqrm"]["viewer"]
    name = "srv_" + uuid.uuid4().hex[:8]
    r = _get(lab, {"image_command": "new_image", "image_name": name, "image_type": "1"},
             auth=(viewer["user"], viewer["password"]))
    assert r.status_code == 200
    assert [i for i in _lab.images(lab["name"]) if i["image_name"] == name] == []
    denied = [e for e in _lab.events(lab["name"]) if e["event_name"] == "authorization"
              and e["event_description"] == f"Un-Authorized access to image-actions from {viewer['user']}"]
    assert denied and denied[-1]["event_priority"] == "1"


def test_the_database_can_be_stopped_and_started(lab):
    name = lab["name"]
    _lab.openqrm_database(name, "stop")
    try:
        with pytest.raises(_lab.LabError, match="openQRM database"):
            _lab.images(name)
        # apache still answers; PHP dies in ADOdb (a TypeError on the failed connection): 500, empty body
        r = _get(lab, {"image_command": "remove_by_name", "image_name": "nothing_here"}, auth=_admin(lab))
        assert (r.status_code, r.text) == (500, "")
    finally:
        _lab.openqrm_database(name, "start")
    assert [i["image_name"] for i in _lab.images(name)][:2] == ["openqrm", "idle"]
