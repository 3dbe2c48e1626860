"""qrmfs/jobs.py: every command's openQRM requests, as openQRM 5.3.60's event_info and image_info store them."""

from __future__ import annotations

import re

import pytest

from qrmfs import jobs, openqrm
from qrmfs.config import OpenQrm, SshHost, Storage
from qrmfs.errors import ConfigError, UsageError
from qrmfs.model import NAME_RE, image_name

LONGEST = "x" * 50
NAS = Storage("nas1", SshHost("10.0.0.5"), storage_id=4)


@pytest.mark.parametrize("command", jobs.COMMANDS)
@pytest.mark.parametrize("name", ["a", "web1", LONGEST, "y" * 38, "Z_9" * 16])
def test_event_names_fit_event_info_and_pair(command: str, name: str) -> None:
    """VARCHAR(50) under strict mode: a longer event_name is never stored. 9, 10 and 3 share the name."""
    assert NAME_RE.fullmatch(name)
    reqs = [jobs.started(command, name, f"nas1:/exports/{name}"), jobs.finished(command, name, "t"),
            *jobs.failed(command, name, "why")]
    names = {r.params["event_name"] for r in reqs}
    assert len(names) == 1
    (ev,) = names
    assert len(ev) <= jobs.EVENT_NAME_MAX
    assert ev.startswith(f"{command}_image_")
    assert [r.params["event_priority"] for r in reqs] == ["9", "10", "3", "10"]


def test_long_names_get_distinct_event_names() -> None:
    a, b = "a" * 49 + "b", "a" * 49 + "c"
    assert jobs.event_name("rollback", a) != jobs.event_name("rollback", b)
    assert jobs.event_name("create", "web1") == "create_image_web1"


@pytest.mark.parametrize("text", [
    "Started to create image web1 on nas1:/exports/it's",
    "Failed: rsync said \"can't\" \\ back",
    "Pfad /exports/Grüße/ünïcödé 🚀",
    "x" * 300 + "'" * 50,
    "%" * 400,
])
def test_descriptions_are_stored_whole_and_found_again(text: str) -> None:
    """No `'` or `\\` (openQRM's de-duplication query breaks on them), ASCII only, at most 255 characters."""
    d = jobs.description(text)
    assert len(d) <= jobs.DESCRIPTION_MAX
    assert all(" " <= c <= "~" for c in d)
    assert "'" not in d and "\\" not in d
    assert all(re.fullmatch("[0-9A-F]{2}", d[i + 1:i + 3]) for i, c in enumerate(d) if c == "%")


def test_a_short_description_round_trips() -> None:
    from urllib.parse import unquote
    text = "image it's on /exports/Grüße \\ 100%"
    assert unquote(jobs.description(text)) == text


def test_image_fields_use_the_servers_ids() -> None:
    f = jobs.image_fields(OpenQrm(deployment_id=17964780252743), NAS, name="web1", rootdevice="/exports/web1",
                          shared=True, comment="it's mine", arch="x86_64", os_name="Debian 12")
    assert f == {"image_name": "web1", "image_type": "17964780252743", "image_rootdevice": "/exports/web1",
                 "image_rootfstype": "nfs", "image_storageid": "4", "image_isshared": "1",
                 "image_comment": "it%27s mine", "image_capabilities": "arch=x86_64 os=Debian 12"}


def test_a_record_without_the_servers_ids_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"set \[openqrm\] deployment_id"):
        jobs.image_fields(OpenQrm(), NAS, name="n", rootdevice="/exports/n", shared=False, comment="",
                          arch=None, os_name=None)
    with pytest.raises(ConfigError, match=r"openQRM's id of storage server nas2: set \[storage.nas2\] storage_id"):
        jobs.image_fields(OpenQrm(deployment_id=2), Storage("nas2", SshHost("h")), name="n", rootdevice="/e/n",
                          shared=False, comment="", arch=None, os_name=None)
    with pytest.raises(UsageError, match="root device of 260 characters"):
        jobs.image_fields(OpenQrm(deployment_id=2), NAS, name="n", rootdevice="/" + "d" * 259, shared=False,
                          comment="", arch=None, os_name=None)


@pytest.mark.parametrize("name", ["openqrm", "idle", "OpenQRM", "IDLE"])
def test_openqrms_own_names_are_refused(name: str) -> None:
    """remove_by_name never removes them, and MariaDB compares names without case."""
    with pytest.raises(UsageError, match="openQRM keeps its own image of that name"):
        image_name(name)


def test_each_commands_job() -> None:
    f = {"image_name": "n"}
    kinds = [(r.params.get("image_command") or r.params["event_priority"])
             for r in jobs.requests("update", "n", "t", f, replace=True)]
    assert kinds == ["9", "remove_by_name", "new_image", "10"]
    assert [r.params.get("image_command") or r.params["event_priority"]
            for r in jobs.requests("remove", "n", "t", None, replace=True)] == ["9", "remove_by_name", "10"]
    assert [r.params["event_priority"] for r in jobs.requests("rollback", "n", "t")] == ["9", "10"]


def test_abandon_keeps_the_start_and_reports_the_failure() -> None:
    j = jobs.job("http://q/openqrm", "u", "clone", "n", "t", jobs.requests("clone", "n", "t", {"image_name": "n"}))
    jobs.abandon(j, "rsync failed: 'x'")
    assert [(r.params["event_name"], r.params["event_priority"]) for r in j.requests] == [
        ("clone_image_n", "9"), ("clone_image_n", "3"), ("clone_image_n", "10")]
    assert j.requests[1].params["event_description"] == "Failed to clone image n: rsync failed: %27x%27"


def test_abandon_of_a_job_spooled_before_jobs_had_a_command() -> None:
    j = openqrm.Job("http://q/openqrm", "u", "n", "t", [openqrm.event("update_image_n", 9, "s")])
    jobs.abandon(j, "stopped")
    assert [r.params["event_name"] for r in j.requests] == ["update_image_n"] * 3
