"""The openQRM boot's pure parts (lab/boot/openqrm.py) and what the console says on that path (serial.py)."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from lab.boot import openqrm as oqb
from lab.boot.serial import parse_serial
from lab.images import LabError

SHARED = Path(__file__).resolve().parents[3] / "shared" / "openqrm-5.3.60"


def test_guest_net_sits_at_the_top_of_the_lab_subnet() -> None:
    n = oqb.guest_net("192.168.64.0/20")
    assert (n.subnet, n.gateway, n.dns, n.ip, n.netmask) == (
        "192.168.64.0/20", "192.168.64.1", "192.168.79.252", "192.168.79.253", "255.255.240.0")
    with pytest.raises(LabError, match="16 addresses"):
        oqb.guest_net("10.1.2.0/29")
    with pytest.raises(LabError, match="IPv4"):
        oqb.guest_net("fd00::/64")


def test_netdev_forwards_http_to_the_server_and_nfs_ports_to_the_storage_only() -> None:
    n = oqb.guest_net("172.20.0.0/16")
    d = oqb.netdev(n, "172.20.0.4", "172.20.0.2")
    assert d.startswith("user,id=net0,restrict=on,net=172.20.0.0/16,host=172.20.0.1,dns=172.20.255.252,")
    fwds = [p.split("-cmd:")[0] for p in d.split(",") if p.startswith("guestfwd=")]
    assert fwds == ["guestfwd=tcp:172.20.0.4:80", "guestfwd=tcp:172.20.0.2:111", "guestfwd=tcp:172.20.0.2:20048",
                    "guestfwd=tcp:172.20.0.2:2049"]
    assert d.count("relay.py 172.20.0.2 2049") == 1 and d.count("relay.py 172.20.0.4 80") == 1
    with pytest.raises(LabError, match="not in the lab network"):
        oqb.netdev(n, "10.0.0.4", "172.20.0.2")
    with pytest.raises(LabError, match="collide"):
        oqb.netdev(n, "172.20.255.253", "172.20.0.2")


def test_kernel_cmdline_is_what_openqrm_pxelinux_gives_a_new_resource() -> None:
    n = oqb.guest_net("172.20.0.0/16")
    line = oqb.kernel_cmdline("172.20.0.4", n, "52:54:00:AB:cd:01")
    words = line.split()
    assert "id=-1" in words and "openqrm=172.20.0.4" in words and "net.ifnames=0" in words
    assert "ip=172.20.255.253:172.20.0.4:172.20.0.1:255.255.0.0" in words
    assert "BOOTIF=01-52-54-00-ab-cd-01" in words
    assert all("'" not in w and '"' not in w and ";" not in w for w in words)  # linuxrc evals the command line


def test_busybox_applets_are_linked_where_debian_and_openqrm_look_never_over_bash() -> None:
    got = oqb.busybox_applets("/bin/busybox\n/bin/ash\n/usr/bin/wget\n/sbin/ifconfig\n/bin/bash\n/usr/bin/../x\n")
    assert got == ["bin/ash", "usr/bin/wget", "bin/wget", "sbin/ifconfig", "bin/ifconfig"]


def test_parse_parameters_reads_get_parameter_as_linuxrc_sources_it() -> None:
    text = 'resource_id="17"\nresource_mac="52:54:00:12:34:56"\nimage_storage_server_ip=10.0.0.2\n<br>\nx y=1\n'
    assert oqb.parse_parameters(text) == {"resource_id": "17", "resource_mac": "52:54:00:12:34:56",
                                          "image_storage_server_ip": "10.0.0.2"}


def test_resource_url_is_a_new_resource_by_mac_with_the_client_basedir() -> None:
    n = oqb.guest_net("172.20.0.0/16")
    url = urlsplit(oqb.resource_url("172.20.0.4", "52:54:00:ab:cd:01", n.ip, n.netmask))
    assert (url.scheme, url.netloc, url.path) == ("http", "172.20.0.4:80", "/openqrm/action/resource-monitor.php")
    q = {k: v[0] for k, v in parse_qs(url.query).items()}
    assert q == {"resource_command": "get_parameter", "resource_id": "-1", "resource_mac": "52:54:00:AB:CD:01",
                 "resource_ip": "172.20.255.253", "resource_subnet": "255.255.0.0", "resource_basedir": "/usr/share"}


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/openqrm-5.3.60 beside the repository")
def test_client_bundle_has_openqrms_functions_the_stand_ins_and_this_boots_script(monkeypatch: pytest.MonkeyPatch
                                                                                   ) -> None:
    monkeypatch.setenv(oqb.OPENQRM_SRC_ENV, str(SHARED))
    src = oqb.openqrm_src()
    with tarfile.open(fileobj=io.BytesIO(oqb.client_bundle(src, "echo hi\n")), mode="r:gz") as tar:
        names = {m.name: m for m in tar.getmembers()}
        base = "usr/share/openqrm"
        assert tar.extractfile(f"{base}/include/openqrm-functions").read() == (  # type: ignore[union-attr]
            src / "src/include/openqrm-functions").read_bytes()
        assert names[f"{base}/etc/init.d/openqrm-client"].mode == 0o755
        assert f"{base}/etc/systemd/system/openqrm-client.service" in names
        assert tar.extractfile(f"{base}/lab/test.sh").read() == b"echo hi\n"  # type: ignore[union-attr]
        assert names[base].isdir()
    with tarfile.open(fileobj=io.BytesIO(oqb.client_bundle(src, None)), mode="r:gz") as tar:
        assert "usr/share/openqrm/lab/test.sh" not in tar.getnames()


def test_openqrm_src_missing_says_where_it_looked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(oqb.OPENQRM_SRC_ENV, str(tmp_path))
    with pytest.raises(LabError, match=r"openQRM's source is not at .*openqrm-linuxrc"):
        oqb.openqrm_src()


def test_console_of_openqrm_linuxrc() -> None:
    ok = parse_serial("Image Type: 'nfs-deployment' - Appliance Name: 'lab-node-1'\n"
                      "nfs-storage: Mounted 10.0.0.2:/exports/img1 rw\n")
    assert (ok.openqrm_image_type, ok.openqrm_appliance) == ("nfs-deployment", "lab-node-1")
    assert ok.mounted and ok.openqrm_root == "10.0.0.2:/exports/img1" and ok.fatal is None
    for line in ("ERROR: Could not reach the openQRM-Server at 10.0.0.4!",
                 "ERROR: Could not mount 10.0.0.2:/exports/img1 by nfs",
                 "WARNING: Failed to get the openqrm-client package! Starting an emergency shell",
                 "Resource IP: 10.0.0.9 = Detected initrd as initramfs, starting a shell"):
        r = parse_serial(f"Getting resource-parameters ...\n{line}\nlater: ERROR: something else\n")
        assert r.fatal == f"openQRM's linuxrc: {line}", line
