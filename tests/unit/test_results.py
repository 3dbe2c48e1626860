"""qrmfs/results.py: an image's registration says what openQRM's answers showed, and no more (issue 24, item 3).
openQRM 5.3 shows no record, so no state says "registered" or "deregistered"."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qrmfs import jobs
from qrmfs.results import Built, Registration, RegState, Removed, RolledBack, render_json

DOCS = Path(__file__).resolve().parents[2] / "docs"
T = "2026-12-05T16:34:32Z"
SENT = Registration(RegState.SENT, time=T, via="create", seen=jobs.SEEN["new_image"])


def test_no_state_claims_a_record_nobody_saw() -> None:
    assert {s.value for s in RegState} == {"sent", "pending", "not_registered", "deregistration_sent", "unknown"}
    assert RegState.parse("registered") is RegState.UNKNOWN  # only a manifest of schema 3+ reaches parse


@pytest.mark.parametrize(("reg", "text"), [
    (SENT, f"sent ({T} by create; new_image ran for an administrator; openQRM 5.3 shows no record, so the record "
           "itself is not verified; see docs/openqrm.md)"),
    (Registration(RegState.DEREGISTRATION_SENT, seen=jobs.SEEN["remove_by_name"]),
     "deregistration sent (remove_by_name ran for an administrator; openQRM 5.3 shows no record, so the removal "
     "itself is not verified; see docs/openqrm.md)"),
    (Registration(RegState.PENDING, "j1", "openQRM did not answer"), "pending (spool job j1)"),
    (Registration(RegState.NOT_REGISTERED), "not registered"),
    (Registration(RegState.UNKNOWN, "j1", "pending in the manifest, not in this spool"), "unknown"),
])
def test_each_state_is_shown_in_plain_words(reg: Registration, text: str) -> None:
    assert str(reg) == text


@pytest.mark.parametrize(("state", "has_record"), [
    (RegState.SENT, True), (RegState.PENDING, True), (RegState.UNKNOWN, True),
    (RegState.NOT_REGISTERED, False), (RegState.DEREGISTRATION_SENT, False)])
def test_sent_counts_as_a_record_wherever_qrmfs_asks(state: RegState, has_record: bool) -> None:
    """update/rollback/remove send their requests, create/clone --force keep the record, the name check refuses:
    all of them ask has_record, and a sent registration is taken for a record as "registered" was."""
    assert Registration(state).has_record is has_record


def test_every_command_shows_it_after_openqrm_and_json_carries_the_words() -> None:
    built = Built("create", "web1", "nas1:/exports/web1", "web1:/", "ssh", 3, 2**20, False, None, 0, "clean", SENT)
    assert built.text() == f"created nas1:/exports/web1 from web1:/: 3 files, 1.0 MiB; openQRM: {SENT}"
    rolled = RolledBack("nas1:/exports/web1", "/exports/.web1.qrmfs-gen-1", T, "/exports/.web1.qrmfs-gen-2", SENT)
    assert rolled.text().endswith(f"is kept as /exports/.web1.qrmfs-gen-2; openQRM: {SENT}")
    gone = Removed("nas1:/exports/web1", Registration(RegState.DEREGISTRATION_SENT, seen=jobs.SEEN["remove_by_name"]))
    assert gone.text().startswith("removed nas1:/exports/web1; openQRM: deregistration sent (remove_by_name ran")
    reg = json.loads(render_json("create", built))["result"]["registration"]
    assert reg == {"state": "sent", "spool_job": None, "error": None, "time": T, "via": "create",
                   "seen": jobs.SEEN["new_image"]}


def test_the_words_are_the_ones_docs_openqrm_explains() -> None:
    doc = (DOCS / "openqrm.md").read_text()
    for command in ("new_image", "remove_by_name"):
        assert jobs.SEEN[command] in doc
