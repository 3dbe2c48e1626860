"""The contract between the lab's mock and the real openQRM 5.3.60 server: the same requests, sent to both
from the same database content, answer the same status and leave the same rows in image_info, event_info
and deployment_info (new ids and event times normalised). The requests are qrmfs's own (built by
qrmfs.jobs and qrmfs.openqrm) and the edge cases of the real server's PHP and MariaDB in strict mode."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from lab import lab as _lab
from qrmfs import jobs, openqrm
from qrmfs.config import OpenQrm, SshHost, Storage

pytestmark = pytest.mark.e2e

TABLES = {"images": "image_id", "events": "event_id", "deployments": "deployment_id"}
# A request: (kind "image" | "event", params, who: "admin" | "viewer" | None)
Req = tuple[str, dict[str, str], str | None]


def _real_tables(name: str) -> dict[str, list[dict[str, Any]]]:
    return {"images": _lab.images(name), "events": _lab.events(name), "deployments": _lab.deployments(name)}


def _effect(before: dict[str, list[dict[str, Any]]], after: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Rows removed, rows added (ids -> new0, new1, ... in id order; event_time dropped) and rows changed
    (event_time dropped: a de-duplicated event only gets a new time), per table."""
    out: dict[str, Any] = {}
    for table, key in TABLES.items():
        b = {r[key]: r for r in before[table]}
        a = {r[key]: r for r in after[table]}
        new = sorted((k for k in a if k not in b), key=int)
        names = {k: f"new{i}" for i, k in enumerate(new)}

        def norm(r: dict[str, Any], key: str = key, names: dict[str, str] = names) -> dict[str, Any]:
            return {c: names.get(v, v) if c == key else v for c, v in r.items() if c != "event_time"}

        out[table] = {"removed": sorted(str(k) for k in b if k not in a),
                      "added": [norm(a[k]) for k in new],
                      "changed": {str(k): norm(a[k]) for k in a if k in b and norm(a[k]) != norm(b[k])}}
    return out


def _send(base: str, req: Req, lab: dict[str, Any]) -> tuple[int, str]:
    kind, params, who = req
    auth = None
    if who == "admin":
        auth = (lab["openqrm"]["user"], lab["openqrm"]["password"])
    elif who == "viewer":
        auth = (lab["openqrm"]["viewer"]["user"], lab["openqrm"]["viewer"]["password"])
    path = openqrm.EVENT_PATH if kind == "event" else openqrm.IMAGE_PATH
    r = httpx.get(base + path, params=params, auth=auth, timeout=30)
    return r.status_code, r.text if r.status_code == 200 else ""


def _image(params: dict[str, str], who: str | None = "admin") -> Req:
    return ("image", params, who)


def _qrmfs(req: openqrm.Request, who: str | None = None) -> Req:
    return (req.kind, dict(req.params), who or ("admin" if req.kind == "image" else None))


def _event(name: str, priority: str, description: str, source: str = "qrmfs") -> Req:
    return ("event", {"resource_command": "post_event", "resource_id": "0", "event_name": name,
                      "event_priority": priority, "event_source": source, "event_description": description}, None)


def _cases(n: str, dep: int, sid: int) -> dict[str, list[Req]]:
    """Each case: the requests, in order. `n`: a name no other run used; dep/sid: the real server's ids."""
    storage = Storage("storage", SshHost("storage"), storage_id=sid)
    fields = jobs.image_fields(OpenQrm(deployment_id=dep), storage, name=n, rootdevice=f"/exports/{n}",
                               shared=False, comment="made by qrmfs, it's 100% \\ ok", arch="x86_64",
                               os_name="debian12")
    target = f"storage:/exports/{n}"
    long_name = n + "_" + "x" * 40  # its event name is cut to 50 characters with a digest
    return {
        # what qrmfs sends: the jobs of its commands (qrmfs.jobs), and its probes
        "qrmfs create": [_qrmfs(r) for r in jobs.requests("create", n, target, fields)],
        "qrmfs update replacing the record": [_qrmfs(r) for r in jobs.requests("create", n, target, fields)]
        + [_qrmfs(r) for r in jobs.requests("update", n, target, {**fields, "image_isshared": "1"}, replace=True)],
        "qrmfs create failing": [_qrmfs(jobs.started("create", n, target)),
                                 *(_qrmfs(r) for r in jobs.failed("create", n, "rsync exited 23: it's \\ broken"))],
        "qrmfs remove": [_qrmfs(r) for r in jobs.requests("create", n, target, fields)]
        + [_qrmfs(r) for r in jobs.requests("remove", n, target, None, replace=True)],
        "qrmfs with a long name": [_qrmfs(r) for r in jobs.requests("clone", long_name, target, None)],
        "qrmfs check probe": [_image({})],
        "qrmfs role probe": [_image(dict(openqrm.ROLE_PROBE)), _image(dict(openqrm.ROLE_PROBE), "viewer"),
                             _image(dict(openqrm.ROLE_PROBE), None)],
        "the web UI's identifier picks the storage id": [
            _image({"image_command": "new_image", "image_name": n, "action": "add", "identifier[]": str(sid)})],
        # the type is read as a deployment id; the storage id is a number
        "new_image with the deployment's name, as qrmfs sent it before": [
            _qrmfs(openqrm.new_image({**fields, "image_type": "nfs-deployment"}))],
        "new_image unknown deployment id, storage id not a number": [
            _image({"image_command": "new_image", "image_name": n, "image_type": "4711", "image_storageid": "abc"})],
        "new_image without type or storage id": [_image({"image_command": "new_image", "image_name": n,
                                                          "image_storageid": ""})],
        "new_image twice, remove_by_name in other case removes both": [
            _image({"image_command": "new_image", "image_name": n}), _image({"image_command": "new_image",
                                                                             "image_name": n}),
            _qrmfs(openqrm.remove_by_name(n.upper()))],
        "new_image name too long for the column": [_image({"image_command": "new_image", "image_name": n + "x" * 250})],
        "remove_by_name idle and openqrm are kept": [_qrmfs(openqrm.remove_by_name("idle")),
                                                     _qrmfs(openqrm.remove_by_name("openqrm"))],
        "remove_by_name with a quote": [_image({"image_command": "new_image", "image_name": f"{n}'q"}),
                                        _qrmfs(openqrm.remove_by_name(f"{n}'q"))],
        "unknown command": [_image({"image_command": f"frob_{n}", "image_name": n})],
        "not an administrator": [_image({"image_command": "new_image", "image_name": n}, "viewer"),
                                 _image({"image_command": "remove_by_name", "image_name": "idle"}, "viewer")],
        "no credentials": [_image({"image_command": "new_image", "image_name": n}, None)],
        "9 then 10 pair by name and source": [_event(n, "9", "a"), _event(n, "9", "b", source="other"),
                                               _event(n, "10", "c")],
        "de-duplication, case and trailing spaces": [_event(n, "5", "same"), _event(n, "5", "same"),
                                                     _event(n.upper(), "5", "SAME  ")],
        "event name over 50 characters is lost": [_event(n + "e" * 50, "5", "x")],
        "a quote in the description loses the event": [_event(n, "3", "it's"), _event(n, "9", "s"),
                                                       _event(n, "10", "it's done")],
        "description cut at 255, never de-duplicated": [_event(n, "5", "d" * 300), _event(n, "5", "d" * 300)],
        "description cut inside a character is lost": [_event(n, "5", "d" * 254 + "\u00e9")],
        "outside the BMP is lost": [_event(n, "5", "snow \U0001F600")],
        "backslashes and filtered tags": [_event(n, "5", "a <abc> b <x:y> c\\d"),
                                          _event(n, "5", "a <abc> b <x:y> c\\d")],
        "priority 0 and 7 kept, 99 kept with 500, none lost with 500": [
            _event(n, "0", "x"), _event(n, "7", "x"), _event(n, "99", "y"), _event(n, "", "z")],
        "post_event without resource id": [("event", {"resource_command": "post_event", "event_name": n,
                                                     "event_priority": "5", "event_description": "x"}, None)],
        "update_image and remove by id": [_image({"image_command": "update_image", "image_id": "4711",
                                                  "image_comment": "x"}),
                                          _image({"image_command": "update_image", "image_comment": "x"}),
                                          _image({"image_command": "remove", "image_id": "4711"})],
        "deployment types": [_image({"image_command": "add_deployment_type", "deployment_name": n,
                                     "deployment_type": f"{n}-dep", "deployment_description": "T",
                                     "deployment_storagetype": "t", "deployment_storagedescription": "T"}),
                             _image({"image_command": "add_deployment_type", "deployment_name": n,
                                     "deployment_type": f"{n}-dep" + "x" * 50}),
                             _image({"image_command": "remove_deployment_type", "deployment_name": f"{n}-dep"})],
    }


CASES = list(_cases("n", 1, 1))


@pytest.fixture(scope="module")
def both(lab: dict[str, Any]) -> Callable[[list[Req]], tuple[Any, Any]]:
    mock_base = lab["openqrm_mock"]["url"]

    def run(reqs: list[Req]) -> tuple[Any, Any]:
        before = _real_tables(lab["name"])
        httpx.post(lab["openqrm_mock"]["base"] + "/_mock/state", json=before, timeout=30).raise_for_status()
        real_answers = [_send(lab["openqrm"]["url"], r, lab) for r in reqs]
        mock_answers = [_send(mock_base, r, lab) for r in reqs]
        mock_after = httpx.get(lab["openqrm_mock"]["base"] + "/_mock/state", timeout=30).json()
        real = (real_answers, _effect(before, _real_tables(lab["name"])))
        mock = (mock_answers, _effect(before, {t: mock_after[t] for t in TABLES}))
        return real, mock

    yield run
    httpx.post(lab["openqrm_mock"]["base"] + "/_mock/reset", timeout=30)


@pytest.mark.parametrize("case", CASES)
def test_the_mock_does_what_the_real_server_does(lab, both, case):
    n = "ct_" + uuid.uuid4().hex[:10]
    reqs = _cases(n, lab["openqrm"]["nfs_deployment_id"], lab["openqrm"]["storage_ids"]["storage"])[case]
    real, mock = both(reqs)
    assert mock == real


def test_the_contract_sees_a_difference(lab, both):
    """The comparison is not blind: a request that stores on the real server but not on the mock (the
    mock's table is emptied of the deployment type, so new_image stores an empty type there) differs."""
    n = "ct_" + uuid.uuid4().hex[:10]
    dep = str(lab["openqrm"]["nfs_deployment_id"])
    req = _image({"image_command": "new_image", "image_name": n, "image_type": dep})
    before = _real_tables(lab["name"])
    httpx.post(lab["openqrm_mock"]["base"] + "/_mock/state",
               json={**before, "deployments": [d for d in before["deployments"] if d["deployment_type"] == "ram"]},
               timeout=30).raise_for_status()
    _send(lab["openqrm"]["url"], req, lab)
    _send(lab["openqrm_mock"]["url"], req, lab)
    mock_after = httpx.get(lab["openqrm_mock"]["base"] + "/_mock/state", timeout=30).json()
    real_added = _effect(before, _real_tables(lab["name"]))["images"]["added"]
    mock_added = _effect(before, {t: mock_after[t] for t in TABLES})["images"]["added"]
    assert [r["image_type"] for r in real_added] == ["nfs-deployment"]
    assert [r["image_type"] for r in mock_added] == [""]
