"""Every openQRM request of every qrmfs command, built in one place: the events (9 started, 10 finished, 3 failed)
and the image records (new_image, remove_by_name) of create, clone, update, rollback and remove.

A dry run shows exactly these requests (`planned`), and the real run sends them through the spool.

What openQRM 5.3.60 stores (docs/openqrm.md, "Events"): event_info.event_name is VARCHAR(50) and MariaDB's strict
mode refuses a longer one (the event is lost, the answer is still 200); event_description is VARCHAR(255), cut by
openQRM at 255 *bytes* (a cut inside a UTF-8 character is refused too); a `'` or `\\` in a description breaks
openQRM's de-duplication query (the event is lost). A priority 10 marks every earlier priority 9 of the same
event_name and source as done. So event names here are at most 50 characters and the same for a command's 9, 10
and 3, and descriptions are printable ASCII of at most 255 characters, whatever the path or name.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from typing import Any

from . import openqrm
from .config import OpenQrm, Storage
from .errors import ConfigError, UsageError
from .options import IMAGE_OPTIONS

STARTED, FINISHED, FAILED = 9, 10, 3
# What openQRM 5.3's answers show (docs/openqrm.md): image-action.php's newline means it ran the command for an
# administrator; nothing it answers shows the record, nor whether an insert or delete took effect, nor an event.
# These words follow a registration's state (results.RegState: sent, deregistration sent) wherever it is shown.
SEEN = {"new_image": "new_image ran for an administrator; openQRM 5.3 shows no record, so the record itself is not "
                     "verified; see docs/openqrm.md",
        "remove_by_name": "remove_by_name ran for an administrator; openQRM 5.3 shows no record, so the removal "
                          "itself is not verified; see docs/openqrm.md",
        "event": "events: sent, openQRM's answer to an event shows nothing"}
RECORD_TEXT_MAX = 255      # image_info.image_rootdevice, image_comment, image_capabilities: VARCHAR(255)

EVENT_NAME_MAX = 50        # event_info.event_name VARCHAR(50)
DESCRIPTION_MAX = 255      # event_info.event_description VARCHAR(255)
COMMANDS = ("create", "clone", "update", "rollback", "remove")
# how a description names each command's work: (verb, -ing form, preposition before the target)
_WORDS = {"create": ("create", "on"), "clone": ("clone", "on"), "update": ("update", "on"),
          "rollback": ("roll back", "on"), "remove": ("remove", "from")}


def event_name(command: str, name: str) -> str:
    """`COMMAND_image_NAME`, at most 50 characters: a longer one ends in a digest of the whole name instead, so
    two long names never share an event name (their 9 and 10 pair only with each other)."""
    if command not in _WORDS:
        raise ValueError(f"no openQRM events for command {command!r}")
    full = f"{command}_image_{name}"
    if len(full) <= EVENT_NAME_MAX:
        return full
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    keep = EVENT_NAME_MAX - len(f"{command}_image_") - len(digest) - 1
    return f"{command}_image_{name[:keep]}_{digest}"


def description(text: str) -> str:
    """What openQRM stores whole and finds again: printable ASCII without `'` and `\\` (anything else written as
    %XX of its UTF-8 bytes), at most 255 characters (a longer one keeps its start and end around `...`)."""
    out = "".join(c if " " <= c <= "~" and c not in "'\\%" else "".join(f"%{b:02X}" for b in c.encode())
                  for c in text)
    if len(out) <= DESCRIPTION_MAX:
        return out
    head = (DESCRIPTION_MAX - 3) * 2 // 3
    tail = len(out) - (DESCRIPTION_MAX - 3 - head)
    head -= 1 if out[head - 1] == "%" else 2 if out[head - 2] == "%" else 0  # never inside a %XX
    tail += 2 if out[tail - 1] == "%" else 1 if out[tail - 2] == "%" else 0
    return out[:head] + "..." + out[tail:]

def event(command: str, name: str, priority: int, text: str) -> openqrm.Request:
    return openqrm.event(event_name(command, name), priority, description(text))


def started(command: str, name: str, target: str) -> openqrm.Request:
    verb, prep = _WORDS[command]
    return event(command, name, STARTED, f"Started to {verb} image {name} {prep} {target}")


def finished(command: str, name: str, target: str) -> openqrm.Request:
    verb, prep = _WORDS[command]
    return event(command, name, FINISHED, f"Finished to {verb} image {name} {prep} {target}")


def failed(command: str, name: str, why: str) -> list[openqrm.Request]:
    """A failure: the error (3), then the end of the long-running action (10), which marks its 9 as done."""
    verb, _prep = _WORDS[command]
    return [event(command, name, FAILED, f"Failed to {verb} image {name}: {why}"),
            event(command, name, FINISHED, f"Ended {verb} image {name}")]


def image_fields(oq: OpenQrm, storage: Storage, *,  # noqa: PLR0913 - keyword-only: the columns of a record
                 name: str, rootdevice: str, shared: bool, comment: str, arch: str | None,
                 os_name: str | None) -> dict[str, str]:
    """new_image's image_* parameters for an NFS-root image, as a real openQRM uses them: image_type is the id of
    that server's nfs-deployment type, image_storageid its id of the storage server (both from the config, which
    `qrmfs check` shows how to find), image_rootdevice the path. Refused (before anything is done) without them."""
    if oq.deployment_id is None:
        raise ConfigError("registering needs the openQRM server's id of its nfs-deployment type: set [openqrm] "
                          "deployment_id (docs/openqrm.md, \"The values a record needs\"), or -o to register nothing")
    if storage.storage_id is None:
        raise ConfigError(f"registering needs openQRM's id of storage server {storage.name}: set [storage."
                          f"{storage.name}] storage_id (docs/openqrm.md, \"The values a record needs\"), or -o to "
                          "register nothing")
    if len(rootdevice) > RECORD_TEXT_MAX:
        raise UsageError(f"openQRM cannot record a root device of {len(rootdevice)} characters (at most "
                         f"{RECORD_TEXT_MAX}): {rootdevice[:60]}...")
    caps = " ".join(f"{k}={v}" for k, v in (("arch", arch), ("os", os_name)) if v)
    return {
        "image_name": name,
        "image_type": str(oq.deployment_id),
        "image_rootdevice": rootdevice,
        "image_rootfstype": "nfs",
        "image_storageid": str(storage.storage_id),
        "image_isshared": "1" if shared else "0",
        "image_comment": description(comment),
        "image_capabilities": description(caps),
    }


# the record's fields that follow from an image's options (manifest "options" key -> image_* field)
RECORD_OPTIONS = {o.record: o.openqrm for o in IMAGE_OPTIONS if o.openqrm}


def record_fields_changed(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """The record's fields that differ between two images' options (manifest "options")."""
    return sorted({f for k, f in RECORD_OPTIONS.items() if k in new and old.get(k) != new.get(k)})


def records(name: str, fields: dict[str, str] | None, replace: bool) -> list[openqrm.Request]:
    """The image requests: a new record (fields), replacing the record of that name first (replace: openQRM's
    update_image needs the record's image_id, which no answer of openQRM shows). None: the record stays.
    A new record without replace is only for an image that has none (openQRM would hold two)."""
    if fields is None:
        return [openqrm.remove_by_name(name)] if replace else []
    return [*([openqrm.remove_by_name(name)] if replace else []), openqrm.new_image(fields)]


def closing(command: str, name: str, target: str, fields: dict[str, str] | None = None,
            replace: bool = False) -> list[openqrm.Request]:
    """What follows the work: the records, then the "finished" event."""
    return [*records(name, fields, replace), finished(command, name, target)]


def requests(command: str, name: str, target: str, fields: dict[str, str] | None = None,
             replace: bool = False) -> list[openqrm.Request]:
    """The whole job of a command that succeeds: started, the records, finished."""
    return [started(command, name, target), *closing(command, name, target, fields, replace)]


def job(url: str, user: str | None, command: str, name: str, target: str,
        reqs: list[openqrm.Request]) -> openqrm.Job:
    return openqrm.Job(url, user, name, target, reqs, command=command)


def abandon(job_: openqrm.Job, why: str) -> None:
    """A job whose work did not happen: keep only its "started" event, then report the failure (3, then 10)."""
    command = job_.command or _command_of(job_)
    job_.requests = [r for r in job_.requests if is_started(r)]
    job_.requests += failed(command, job_.image, why)


def is_started(req: openqrm.Request) -> bool:
    return req.kind == "event" and req.params.get("event_priority") == str(STARTED)


def _command_of(job_: openqrm.Job) -> str:
    """A job spooled by a qrmfs before jobs carried their command: the one its first event was named for."""
    for r in job_.requests:
        if r.kind == "event":
            for c in COMMANDS:
                if r.params["event_name"].startswith(f"{c}_image_"):
                    return c
    return "create"


def seen(reqs: Iterable[openqrm.Request]) -> str:
    """What the answers to these (delivered) requests showed, for the manifest and the output."""
    cmds = [r.params.get("image_command") for r in reqs if r.kind == "image"]
    last = cmds[-1] if cmds else "event"
    return SEEN.get(last or "event", SEEN["event"])


def planned(url: str | None, reqs: Iterable[openqrm.Request]) -> list[dict[str, Any]]:
    """A dry run's view of the requests: where each would go, with which parameters (never a password)."""
    return [{"url": (url or "?").rstrip("/") + r.path, "params": dict(r.params)} for r in reqs]
