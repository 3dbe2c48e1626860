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
              "openqrm": {"address": "172.30.0.4", "ssh_port": None},
              "openqrm-mock": {"address": "172.30.0.7", "ssh_port": None}},
    "openqrm": {"url": "http://172.30.0.4:80/openqrm", "user": "openqrm", "password_file": "/s/pw",
                "nfs_deployment_id": 17964779220001,
                "storage_ids": {"storage": 17964779222587, "storage2": 17964779222999}},
    "openqrm_mock": {"url": "http://172.30.0.7:80/openqrm", "user": "openqrm", "password_file": "/s/pw"},
    "ssh": {"private_key": "/s/id_ed25519", "known_hosts": "/s/known_hosts"},
}


def test_lab_config_names_the_storage_and_every_source_host():
    cfg = config.parse(tomllib.loads(_lab.config_toml(INFO)))
    assert cfg.storage["storage"].ssh.address == "172.30.0.2" and cfg.storage["storage"].export_root == "/exports"
    assert sorted(cfg.hosts) == ["source", "sysv"]
    assert cfg.hosts["sysv"].address == "172.30.0.5"
    # the real server's id of the storage server, for both blocks of that server
    assert cfg.storage["storage"].storage_id == cfg.storage["plain"].storage_id == 17964779222587
    assert cfg.openqrm is not None and cfg.openqrm.url == "http://172.30.0.4:80/openqrm"
    assert cfg.openqrm.deployment_id == 17964779220001  # the real server's nfs-deployment id: records need it


def test_the_mock_variant_points_qrmfs_at_the_mock():
    data = tomllib.loads(_lab.config_toml(INFO, server="openqrm_mock"))
    assert data["openqrm"]["url"] == "http://172.30.0.7:80/openqrm"
    assert data["openqrm"]["deployment_id"] == 17964779220001


def test_test_variant_has_its_own_spool_and_quick_retries():
    data = tomllib.loads(_lab.config_toml(INFO, spool_dir='/tmp/a "b"', timeout=3.0, retries=1, backoff=0.05))
    assert data["spool_dir"] == '/tmp/a "b"'
    assert (data["openqrm"]["timeout"], data["openqrm"]["retries"], data["openqrm"]["backoff"]) == (3.0, 1, 0.05)
    assert "timeout" not in tomllib.loads(_lab.config_toml(INFO))["openqrm"]


def test_sources_on_demand_are_named_or_all():
    import pytest

    from lab.images import LabError

    assert _lab.parse_sources(None) == [] and _lab.parse_sources("") == []
    assert _lab.parse_sources("all") == ["bullseye", "dual", "sysv", "trixie", "mounts"] == _lab.extra_sources()
    assert _lab.parse_sources("sysv, mounts") == ["sysv", "mounts"]
    with pytest.raises(LabError, match="unknown lab source"):
        _lab.parse_sources("sysv,gentoo")


def test_each_debootstrap_source_recipe_names_its_suite_and_init():
    from lab import images

    for name in images.source_names():
        r = images.source_recipe(name)
        assert r["suite"] in ("bookworm", "trixie", "bullseye") and r["init"] in ("systemd", "sysv")
        argv = images.debootstrap_argv(r, images.IMAGES / "x")
        assert argv[0] == "debootstrap" and argv[-2] == r["suite"]
        assert images.source_tag(name).startswith(f"qrmfs-lab-src-{name}:")
    sysv = images.debootstrap_argv(images.source_recipe("sysv"), images.IMAGES / "x")
    assert "--exclude=systemd-sysv" in sysv and any(a.startswith("--include=sysvinit-core,") for a in sysv)
    dual = images.debootstrap_argv(images.source_recipe("dual"), images.IMAGES / "x")  # both inits, SysV's /sbin/init
    include = next(a for a in dual if a.startswith("--include=")).split("=", 1)[1].split(",")
    assert "--exclude=systemd-sysv" in dual and {"sysvinit-core", "systemd"} <= set(include)


def test_extra_storage_servers_get_their_own_storage_block_not_a_host_block():
    import pytest

    from lab.images import LabError

    info = {**INFO, "storages": ["storage2"],
            "hosts": {**INFO["hosts"], "storage2": {"address": "172.30.0.6", "ssh_port": 22,
                                                    "export_root": "/exports"}}}
    cfg = config.parse(tomllib.loads(_lab.config_toml(info)))
    assert sorted(cfg.storage) == ["plain", "storage", "storage2"]
    s2 = cfg.storage["storage2"]
    assert (s2.ssh.address, s2.export_root, s2.storage_id) == ("172.30.0.6", "/exports", 17964779222999)
    assert sorted(cfg.hosts) == ["source", "sysv"]
    assert "storage2" not in tomllib.loads(_lab.config_toml(INFO))["storage"]  # the default lab is unchanged
    assert _lab.extra_storages(1) == [] and _lab.extra_storages(3) == ["storage2", "storage3"]
    for bad in (0, _lab.MAX_STORAGES + 1):
        with pytest.raises(LabError, match="--storages"):
            _lab.extra_storages(bad)
