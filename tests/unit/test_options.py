"""qrmfs/options.py, the image options declared once: the CLI's create and update, CreateRequest, the agent's
Options, the manifest's record, update's reading of it, the openQRM fields and the Ansible module follow it. Each
test fails when one of them drifts from the table."""

from __future__ import annotations

import dataclasses
import importlib
import sys
from pathlib import Path
from typing import Any

import pytest
import typer

from qrmfs import cli, jobs
from qrmfs.actions.create import CreateRequest
from qrmfs.actions.update import UpdateRequest, create_request
from qrmfs.agent.manifest import Manifest
from qrmfs.agent.protocol import Options
from qrmfs.config import OpenQrm, SshHost, Storage
from qrmfs.model import Location, Target
from qrmfs.options import IMAGE_OPTIONS, ImageOption

COLLECTIONS = Path(__file__).resolve().parents[2] / "ansible"
if str(COLLECTIONS) not in sys.path:
    sys.path.insert(0, str(COLLECTIONS))
ANSIBLE: Any = importlib.import_module("ansible_collections.qrmfs.qrmfs.plugins.module_utils.qrmfs")
ANSIBLE_IMAGE: Any = importlib.import_module("ansible_collections.qrmfs.qrmfs.plugins.modules.qrmfs_image")
TARGET = Target("nas1", "/exports/web1")
# a value of each option that is not its default, as CreateRequest holds it
OTHER = {"excludes": ("/var/cache",), "private_add": ("/var/lib/app",), "private_exclude": ("/var/lib/app/tmp",),
         "arch": "x86_64", "os_name": "debian12", "keep_services": False, "keep_network": True, "hostname": "web7",
         "shared": True, "route": "nfs"}


def _command(name: str) -> Any:
    """The click command typer makes of a qrmfs command (typer carries its own click)."""
    group: Any = typer.main.get_command(cli.app)
    return group.commands[name]


def _param(command: str, flags: tuple[str, ...]) -> Any:
    """The option of a command that has exactly these flags ("--on/--off" for a pair)."""
    want_on = {f.split("/")[0] for f in flags}
    want_off = {f.split("/")[1] for f in flags if "/" in f}
    found = [p for p in _command(command).params if set(p.opts) == want_on and set(p.secondary_opts) == want_off]
    assert len(found) == 1, f"{command}: no option with the flags {flags}"
    return found[0]


def _value(opt: ImageOption, v: Any) -> Any:
    return v.value if hasattr(v, "value") else v  # model.Route as its value


def test_every_option_has_a_value_other_than_its_default_here() -> None:
    assert set(OTHER) == {o.name for o in IMAGE_OPTIONS}
    assert all(OTHER[o.name] != o.default for o in IMAGE_OPTIONS)


@pytest.mark.parametrize("opt", IMAGE_OPTIONS, ids=lambda o: o.name)
def test_the_cli_has_its_flags_and_default(opt: ImageOption) -> None:
    p = _param("create", opt.create)
    assert (p.default if p.default is not None else ()) == opt.default or p.default == opt.default
    assert _param("update", opt.update).default is None  # not given: the recorded value stays
    assert p.multiple is (opt.kind is list) and (p.is_flag or p.is_bool_flag) is (opt.kind is bool)


@pytest.mark.parametrize("opt", IMAGE_OPTIONS, ids=lambda o: o.name)
def test_create_request_and_the_agents_options_have_it_with_its_default(opt: ImageOption) -> None:
    field = {f.name: f for f in dataclasses.fields(CreateRequest)}[opt.name]
    assert _value(opt, field.default) == opt.default
    if opt.prepare is not None:
        f = {f.name: f for f in dataclasses.fields(Options)}[opt.prepare]
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert default == (list(opt.default) if opt.kind is list else opt.default)


def _request(**kw: Any) -> CreateRequest:
    from qrmfs.model import Route
    if "route" in kw:
        kw["route"] = Route(kw["route"])
    return CreateRequest(name="web1", target=TARGET, location=Location.parse("golden:/"), **kw)


@pytest.mark.parametrize("opt", IMAGE_OPTIONS, ids=lambda o: o.name)
def test_it_is_recorded_prepared_and_read_back_by_update(opt: ImageOption) -> None:
    """Given to create, the option lands in the manifest's options under its key and in the agent's Options;
    update, given nothing, makes the same request from that manifest."""
    req = _request(**{opt.name: OTHER[opt.name]})
    record = req.options_record()
    assert record[opt.record] == (list(OTHER[opt.name]) if opt.kind is list else OTHER[opt.name])
    if opt.prepare is not None:
        got = getattr(req.prepare_options(), opt.prepare)
        assert got == (list(OTHER[opt.name]) if opt.kind is list else OTHER[opt.name])
    manifest = Manifest.new({"options": record, "source": "golden:/"})
    again = create_request(UpdateRequest(TARGET), manifest)
    assert _value(opt, getattr(again, opt.name)) == OTHER[opt.name]
    default = create_request(UpdateRequest(TARGET), Manifest.new({"source": "golden:/"}))  # an old manifest
    assert _value(opt, getattr(default, opt.name)) == opt.default


@pytest.mark.parametrize("opt", [o for o in IMAGE_OPTIONS if o.openqrm], ids=lambda o: o.name)
def test_the_openqrm_field_it_feeds(opt: ImageOption) -> None:
    base = {"name": "web1", "rootdevice": TARGET.path, "comment": "c", "shared": False, "arch": None,
            "os_name": None}
    oq, storage = OpenQrm(deployment_id=3), Storage("nas1", SshHost("nas1"), "/exports", storage_id=2)
    plain = jobs.image_fields(oq, storage, **base)
    other = jobs.image_fields(oq, storage, **{**base, opt.name: OTHER[opt.name]})
    assert {k for k in plain if plain[k] != other[k]} == {opt.openqrm}


@pytest.mark.parametrize("opt", IMAGE_OPTIONS, ids=lambda o: o.name)
@pytest.mark.parametrize("command", ["create", "update"])
def test_the_ansible_module_passes_it_to_the_cli(opt: ImageOption, command: str) -> None:
    """qrmfs_image's parameter of the table's kind, and the argv it makes sets the CLI's option to the value."""
    assert opt.ansible is not None
    spec = ANSIBLE_IMAGE.argument_spec()[opt.ansible]
    assert spec["type"] == opt.kind.__name__ and "default" not in spec  # not given: qrmfs's default, or the record
    value = list(OTHER[opt.name]) if opt.kind is list else OTHER[opt.name]
    params = {"qrmfs_bin": "qrmfs", "config": None, "name": "web1", "target": "nas1:/exports/web1",
              "source": "golden:/", "register": False, opt.ansible: value}
    argv = (ANSIBLE.create_argv if command == "create" else ANSIBLE.update_argv)(params, False)
    cmd = _command(command)
    args = argv[argv.index(command) + 1:]
    ctx = cmd.make_context(command, args, resilient_parsing=True)
    p = _param(command, opt.create if command == "create" else opt.update)
    got = ctx.params[p.name or ""]
    assert (list(got) if opt.kind is list else got) == value
