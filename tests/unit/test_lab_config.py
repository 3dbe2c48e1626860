"""The lab's one qrmfs config writer: what `lab up` writes and the e2e tests' variants parse as qrmfs config."""

from __future__ import annotations

import tomllib

from lab import lab as _lab
from qrmfs import config

INFO = {
    "name": "t",
    "hosts": {"storage": {"address": "172.30.0.2", "ssh_port": 22, "export_root": "/exports"},
              "source": {"address": "172.30.0.3", "ssh_port": 22},
              "sysv": {"address": "172.30.0.5", "ssh_port": 22},
              "openqrm": {"address": "172.30.0.4", "ssh_port": None}},
    "openqrm": {"url": "http://172.30.0.4:80/openqrm", "user": "openqrm", "password_file": "/s/pw"},
    "ssh": {"private_key": "/s/id_ed25519", "known_hosts": "/s/known_hosts"},
}


def test_lab_config_names_the_storage_and_every_source_host():
    cfg = config.parse(tomllib.loads(_lab.config_toml(INFO)))
    assert cfg.storage["storage"].ssh.address == "172.30.0.2" and cfg.storage["storage"].export_root == "/exports"
    assert sorted(cfg.hosts) == ["source", "sysv"]
    assert cfg.hosts["sysv"].address == "172.30.0.5"


def test_test_variant_has_its_own_spool_and_quick_retries():
    data = tomllib.loads(_lab.config_toml(INFO, spool_dir='/tmp/a "b"', timeout=3.0, retries=1, backoff=0.05))
    assert data["spool_dir"] == '/tmp/a "b"'
    assert (data["openqrm"]["timeout"], data["openqrm"]["retries"], data["openqrm"]["backoff"]) == (3.0, 1, 0.05)
    assert "timeout" not in tomllib.loads(_lab.config_toml(INFO))["openqrm"]
