"""An image's manifest (`.qrmfs/manifest.json`): what was done to make it, kept with the image for as long as it
lives, across generations and qrmfs versions. Defined once, here, for both ends: the agent reads and writes it on
the storage server, qrmfs gets it in answers (protocol.py decodes it into a Manifest).

A manifest names its `schema`. Loading one migrates what an earlier qrmfs wrote to the current schema, and
refuses anything else (not JSON, JSON that is not an object, a schema newer than this qrmfs knows) with a
ManifestError, one line. Everything else reads it through Manifest's properties.

Standard library only: this module travels to the storage server with the agent.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

PATH = ".qrmfs/manifest.json"  # inside the image
# 1: every manifest written before the schema was recorded (qrmfs up to 0.1.0 of 2026-12); 2: the schema recorded;
# 3: a registration openQRM answered is "sent", no longer "registered" (openQRM 5.3 shows no record)
SCHEMA = 3
# What a generation's change count names (rsync's itemized changes, the agent's rebase), in this order.
CHANGE_KINDS = ("new", "changed", "metadata", "deleted")


class ManifestError(ValueError):
    """A manifest this qrmfs cannot read: the message is one line naming the file."""


def _from_1(d: dict[str, Any]) -> dict[str, Any]:
    """Schema 1 (no "schema"): the first manifests (before update existed) recorded a registration skipped
    with -o as the state "not registered (-o)"; and none of them had a "generation" (it was the first)."""
    reg = d.get("registration")
    if isinstance(reg, dict) and str(reg.get("state", "")).startswith("not registered"):
        d["registration"] = {**reg, "state": "not_registered"}
    return d


# what an earlier qrmfs's "registered" showed: it took openQRM's 200 for a record (before it read the answer for the
# administrator's role, it wrote no "seen"); openQRM 5.3 shows no record, so it never was seen
REGISTERED_BEFORE = ("recorded as registered by an earlier qrmfs on openQRM's answer 200, which shows neither the "
                     "record nor the role it ran for; see docs/openqrm.md")


def _from_2(d: dict[str, Any]) -> dict[str, Any]:
    """Schema 2 recorded a registration openQRM had answered as "registered", which it never saw (the real
    openQRM 5.3 shows no record): it is "sent", with what was seen kept, or said to be nothing where none was."""
    reg = d.get("registration")
    if isinstance(reg, dict) and reg.get("state") == "registered":
        d["registration"] = {"seen": REGISTERED_BEFORE, **reg, "state": "sent"}
    return d


MIGRATIONS = {1: _from_1, 2: _from_2}  # schema N -> N + 1


def _dict(d: dict[str, Any], key: str) -> dict[str, Any]:
    v = d.get(key)
    return v if isinstance(v, dict) else {}


def _int(d: dict[str, Any], key: str) -> int | None:
    v = d.get(key)
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _str(d: dict[str, Any], key: str) -> str | None:
    v = d.get(key)
    return v if isinstance(v, str) else None


class _Text:
    """A top-level text entry of the manifest (None where it has none, or not a text)."""

    def __init__(self, key: str) -> None:
        self.key = key

    def __get__(self, manifest: Manifest, owner: type) -> str | None:
        return _str(manifest.data, self.key)


class Manifest:
    """One image's manifest, migrated to SCHEMA: `data` is what is written (and what --json shows)."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data

    @classmethod
    def load(cls, data: Any, where: str = "the manifest") -> Manifest:
        """A manifest as decoded JSON: migrated to this schema, or refused."""
        if not isinstance(data, dict):
            raise ManifestError(f"{where} is not a JSON object")
        schema = data.get("schema", 1)
        if not isinstance(schema, int) or isinstance(schema, bool) or schema < 1:
            raise ManifestError(f"{where} names no schema qrmfs knows ({schema!r})")
        if schema > SCHEMA:
            raise ManifestError(f"{where} has schema {schema}, newer than this qrmfs reads ({SCHEMA}): "
                                "use a qrmfs as new as the one that wrote it")
        d = dict(data)
        while schema < SCHEMA:
            d = MIGRATIONS[schema](d)
            schema += 1
        d["schema"] = SCHEMA
        return cls(d)

    @classmethod
    def parse(cls, text: str, where: str = "the manifest") -> Manifest:
        try:
            data = json.loads(text)
        except ValueError:
            raise ManifestError(f"{where} is not JSON") from None
        return cls.load(data, where)

    @classmethod
    def new(cls, fields: dict[str, Any]) -> Manifest:
        """The manifest of an image made now, of this schema."""
        return cls({**fields, "schema": SCHEMA})

    def text(self) -> str:
        return json.dumps(self.data, indent=2, sort_keys=True) + "\n"

    def patched(self, patch: dict[str, Any]) -> Manifest:
        """The manifest with these top-level entries replaced (its schema stays)."""
        return Manifest({**self.data, **patch, "schema": SCHEMA})

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Manifest) and other.data == self.data

    def __repr__(self) -> str:
        return f"Manifest({self.data!r})"

    # --- what the image is --------------------------------------------------------------------------------

    image = _Text("image")
    path = _Text("path")
    target = _Text("target")
    source = _Text("source")
    route = _Text("route")
    created = _Text("created")

    @property
    def made(self) -> str | None:
        """When this generation was finished (or begun), as written."""
        return _str(self.data, "finished") or _str(self.data, "created")

    @property
    def made_by(self) -> str | None:
        """The command that made this generation (or, before generations, the qrmfs run)."""
        return _str(self.generation, "made_by") or _str(self.data, "created_by")

    @property
    def options(self) -> dict[str, Any]:
        """The image's options as they were given (cli.py, model.CreateRequest): what an update keeps."""
        return _dict(self.data, "options")

    def has(self, key: str) -> bool:
        return key in self.data

    def option(self, name: str, default: Any = None) -> Any:
        """One of the image's options; default where the manifest has none (an earlier qrmfs knew no such)."""
        return self.options.get(name, default)

    @property
    def validation_state(self) -> str:
        """"clean" or "problems" when the image was made (validate --fix rewrites it); "unknown" without one."""
        return _str(_dict(self.data, "validation"), "state") or "unknown"

    @property
    def excludes(self) -> list[str]:
        v = self.data.get("excludes")
        return [x for x in v if isinstance(x, str)] if isinstance(v, list) else []

    @property
    def files(self) -> int | None:
        """The image's entries when it was made."""
        return _int(_dict(self.data, "counts"), "files")

    @property
    def bytes(self) -> int | None:
        """The image's allocated bytes when it was made."""
        return _int(_dict(self.data, "counts"), "bytes")

    @property
    def prepared_paths(self) -> frozenset[str]:
        """The paths the preparation changed on purpose (its fixes): they differ from the source in every
        generation, so they are no change of the source (update counts, drift)."""
        fixed = _dict(self.data, "preparation").get("fixed")
        return frozenset(f["path"] for f in fixed or () if isinstance(f, dict) and f.get("path"))

    # --- its generation and registration ----------------------------------------------------------------

    @property
    def generation(self) -> dict[str, Any]:
        return _dict(self.data, "generation")

    @property
    def generation_id(self) -> str | None:
        return _str(self.generation, "id")

    @property
    def changes(self) -> dict[str, int] | None:
        v = self.generation.get("changes")
        return v if isinstance(v, dict) else None

    @property
    def base_copy_method(self) -> str | None:
        return _str(_dict(self.generation, "base_copy"), "method")

    @property
    def exported_for(self) -> tuple[str | None, str | None] | None:
        """The image's own NFS export as last seen done (agent/exports.py): (its kind, the generation id it was
        made for); None where it never was."""
        e = self.data.get("export")
        return (_str(e, "kind"), _str(e, "generation")) if isinstance(e, dict) else None

    @property
    def registration(self) -> RegistrationRecord:
        """The image's openQRM registration as recorded (results.Registration reads it)."""
        reg = _dict(self.data, "registration")
        return RegistrationRecord(**{f.name: _str(reg, f.name) for f in dataclasses.fields(RegistrationRecord)})


@dataclass(frozen=True)
class RegistrationRecord:
    """The manifest's "registration" (results.Registration is what qrmfs makes of it)."""
    state: str | None = None
    spool_job: str | None = None
    error: str | None = None
    time: str | None = None
    via: str | None = None
    seen: str | None = None


def generation_id(manifest: Manifest | None) -> str | None:
    return manifest.generation_id if manifest is not None else None
