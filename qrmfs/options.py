"""The image options, each declared once: its flags on create and update, type and default, where it lands (the
create request, the agent's preparation Options, the manifest's "options", the openQRM field it feeds) and the
Ansible module's parameter for it.

update reads an image's recorded options through this table (recorded()); tests/unit/test_options.py checks the
CLI's create and update flags and defaults, CreateRequest, the agent's Options, the manifest's record, the
openQRM fields and the Ansible argument_spec and argv against it: a change in one place that the others do not
follow fails there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ImageOption:
    name: str                        # its field in CreateRequest
    create: tuple[str, ...]          # create's flags (a bool's --on/--off pair as "--on/--off")
    update: tuple[str, ...]          # update's flags: given, it replaces the recorded value
    kind: type                       # str, bool or list (of str)
    default: Any                     # create's default; what an update assumes when the manifest records none
    record: str                      # its key in the manifest's "options"
    prepare: str | None = None       # the field of the agent's Options it feeds (protocol.Options)
    openqrm: str | None = None       # the new_image field it feeds (jobs.image_fields)
    ansible: str | None = None       # qrmfs_image's parameter for it

    def recorded(self, options: dict[str, Any]) -> Any:
        """Its value in an image's recorded options (with what update gave instead), as CreateRequest holds it."""
        v = options.get(self.record)
        if self.kind is list:
            return tuple(v or ())
        if self.kind is bool:
            return self.default if v is None else bool(v)
        return v if v is not None else self.default


IMAGE_OPTIONS = (
    ImageOption("excludes", ("-e", "--exclude"), ("-e", "--exclude"), list, (), "excludes", prepare="excludes",
                ansible="excludes"),
    ImageOption("private_add", ("--private-add",), ("--private-add",), list, (), "private_add",
                prepare="private_add", ansible="private_add"),
    ImageOption("private_exclude", ("--private-exclude",), ("--private-exclude",), list, (), "private_exclude",
                prepare="private_exclude", ansible="private_exclude"),
    ImageOption("arch", ("-a", "--arch"), ("-a", "--arch"), str, None, "arch", openqrm="image_capabilities",
                ansible="arch"),
    ImageOption("os_name", ("--operation-system", "--operating-system"), ("--operation-system", "--operating-system"),
                str, None, "os", openqrm="image_capabilities", ansible="operating_system"),
    ImageOption("keep_services", ("--keep-services/--remove-services",), ("--keep-services/--remove-services",), bool,
                True, "keep_services", prepare="keep_services", ansible="keep_services"),
    ImageOption("keep_network", ("--keep-network/--remove-network",), ("--keep-network/--remove-network",), bool,
                False, "keep_network", prepare="keep_network", ansible="keep_network"),
    ImageOption("hostname", ("--hostname",), ("--hostname",), str, None, "hostname", prepare="hostname",
                ansible="hostname"),
    ImageOption("shared", ("--shared",), ("--shared/--not-shared",), bool, False, "shared", prepare="shared",
                openqrm="image_isshared", ansible="shared"),
    ImageOption("route", ("--route",), ("--route",), str, "ssh", "route", ansible="route"),  # model.Route's value
)
OPTION = {o.name: o for o in IMAGE_OPTIONS}
