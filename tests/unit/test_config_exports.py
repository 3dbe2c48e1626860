"""[storage.X] exports, export_clients, exports_file: who serves each image's own NFS export (agent/exports.py)."""

from __future__ import annotations

import tomllib

import pytest

from qrmfs import config
from qrmfs.errors import ConfigError

OPENQRM = '[openqrm]\nurl = "http://10.1.2.3:8080/openqrm"\n'


def storage(extra: str, head: str = OPENQRM) -> config.Storage:
    return config.parse(tomllib.loads(f'{head}\n[storage.nas]\naddress = "10.0.0.5"\n{extra}')).storage["nas"]


def test_existing_configs_keep_todays_behaviour_qrmfs_writes_no_export():
    s = storage("")
    assert (s.exports, s.export_clients, s.exports_table) == ("none", None, "")


def test_the_clients_default_to_the_openqrm_servers_address_as_openqrms_own_plugin_writes():
    s = storage('exports = "kernel"')
    assert (s.exports, s.export_clients, s.exports_table) == ("kernel", "10.1.2.3", "/etc/exports")
    g = storage('exports = "ganesha"\nexport_clients = "10.0.0.0/24"\nexports_file = "/etc/ganesha/img.conf"')
    assert (g.exports, g.export_clients, g.exports_table) == ("ganesha", "10.0.0.0/24", "/etc/ganesha/img.conf")
    assert storage('exports = "ganesha"').exports_table == "/etc/ganesha/qrmfs-exports.conf"


@pytest.mark.parametrize(("extra", "head", "message"), [
    ('exports = "nfsd"', OPENQRM, "exports must be one of none, kernel, ganesha, not 'nfsd'"),
    ('exports = "kernel"', "", "needs export_clients"),
    ('exports = "kernel"\nexport_clients = "* (rw)"', OPENQRM, "export_clients '* (rw)' must be one address"),
    ('exports = "kernel"\nexport_clients = "a,b"', OPENQRM, "export_clients 'a,b'"),
    ('exports = "kernel"\nexports_file = "etc/exports"', OPENQRM, "exports_file must be a canonical absolute"),
    ('exports = "kernel"\nexports_file = "/etc/../exports"', OPENQRM, "exports_file must be a canonical absolute"),
    ("exports = 1", OPENQRM, "exports must be a str"),
])
def test_bad_export_settings_are_one_line_and_exit_3(extra: str, head: str, message: str):
    with pytest.raises(ConfigError) as e:
        storage(extra, head)
    assert message in e.value.message and "\n" not in e.value.message
    assert e.value.exit_code == 3
