"""qrmfs/model.py: values validated on creation; a bad value is a UsageError naming what is wrong."""

from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrmfs import model
from qrmfs.errors import UsageError
from qrmfs.model import Location, Target

NAME = re.compile(r"[A-Za-z0-9_]{1,50}")


# --- image names -----------------------------------------------------------------------------------

@given(st.from_regex(r"[A-Za-z0-9_]{1,50}", fullmatch=True))
def test_image_name_accepts_every_valid_name(name: str) -> None:
    assert model.image_name(name) == name


@given(st.text(max_size=60).filter(lambda s: not NAME.fullmatch(s)))
def test_image_name_rejects_everything_else(name: str) -> None:
    with pytest.raises(UsageError) as ei:
        model.image_name(name)
    assert ei.value.exit_code == 2
    assert ei.value.message.startswith("invalid image name ")


@pytest.mark.parametrize("name", ["", "a" * 51, "has-dash", "dot.ted", "sp ace", "img\n", "\nimg", "ünï", "a/b",
                                  "٣", "img\x00", "ｆｕｌｌ"])
def test_image_name_rejects_examples(name: str) -> None:
    with pytest.raises(UsageError, match="use 1-50 letters, digits and '_' only"):
        model.image_name(name)


def test_image_name_boundaries() -> None:
    assert model.image_name("a" * 50) == "a" * 50
    assert model.image_name("_") == "_"
    assert model.image_name("Debian_12") == "Debian_12"


# --- targets ---------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "storage", "path", "name", "parent"), [
    ("nas1:/exports/img1", "nas1", "/exports/img1", "img1", "/exports"),
    ("admin@nas1.example.org:/srv/exports/lab/deb_12", "admin@nas1.example.org", "/srv/exports/lab/deb_12",
     "deb_12", "/srv/exports/lab"),
    ("10.0.0.5:/exports/x", "10.0.0.5", "/exports/x", "x", "/exports"),
    ("local:/exports/img", "local", "/exports/img", "img", "/exports"),
])
def test_target_parse_good(value: str, storage: str, path: str, name: str, parent: str) -> None:
    t = Target.parse(value)
    assert (t.storage, t.path, t.name, t.parent) == (storage, path, name, parent)
    assert str(t) == value


@pytest.mark.parametrize(("value", "why"), [
    ("", "expected STORAGE:/full/path/IMAGE_NAME"),
    ("nas1", "expected STORAGE:/full/path/IMAGE_NAME"),
    (":/exports/img", "expected STORAGE:/full/path/IMAGE_NAME"),
    ("/exports/img", "expected STORAGE:/full/path/IMAGE_NAME"),
    ("nas1:exports/img", "must be an absolute path"),
    ("nas1:/exports/../etc", "not canonical"),
    ("nas1:/exports/./img", "not canonical"),
    ("nas1:/exports//img", "not canonical"),
    ("nas1://exports/img", "not a URL (did you mean 'nas1:/exports/img'?)"),
    ("nas1:/exports/img/", "not canonical"),
    ("nas1:/exports/im\tg", "control character"),
    ("nas1:/exports/img\n", "control character"),
    ("nas1:/exports/img\x7f", "control character"),
    ("-oProxyCommand=x:/exports/img", "expected [user@]hostname or address"),
    ("nas 1:/exports/img", "expected [user@]hostname or address"),
    ("nas1;reboot:/exports/img", "expected [user@]hostname or address"),
    ("nas1:/exports/my image", "image name"),
    ("nas1:/exports/img-1", "image name"),
    ("nas1:/", "root directory is not allowed"),
])
def test_target_parse_bad(value: str, why: str) -> None:
    with pytest.raises(UsageError) as ei:
        Target.parse(value)
    assert why in ei.value.message
    assert ei.value.message.startswith("invalid ")


def test_target_and_location_accept_bracketed_ipv6() -> None:
    assert model.host("[fd00::5]") == "[fd00::5]"  # the host rule itself allows it
    t = Target.parse("[fd00::5]:/exports/img1")
    assert (t.storage, t.path) == ("[fd00::5]", "/exports/img1")
    loc = Location.parse("root@[fd00::7]:/")
    assert (loc.host, loc.path) == ("root@[fd00::7]", "/")


# --- locations -------------------------------------------------------------------------------------

@pytest.mark.parametrize(("value", "host", "path", "local"), [
    ("/", None, "/", True),
    ("/srv/rootfs", None, "/srv/rootfs", True),
    ("/srv/my rootfs", None, "/srv/my rootfs", True),
    ("src1:/", "src1", "/", False),
    ("op@src1.example:/srv/root", "op@src1.example", "/srv/root", False),
])
def test_location_parse_good(value: str, host: str | None, path: str, local: bool) -> None:
    loc = Location.parse(value)
    assert (loc.host, loc.path, loc.is_local) == (host, path, local)
    assert str(loc) == value


@pytest.mark.parametrize(("value", "why"), [
    ("", "expected HOST:/rootfs"),
    ("srv/rootfs", "expected HOST:/rootfs or an absolute local directory"),
    ("src1", "expected HOST:/rootfs"),
    ("src1:srv", "must be an absolute path"),
    ("src1:", "must be an absolute path"),
    ("/srv/../etc", "not canonical"),
    ("/srv/rootfs/", "not canonical"),
    ("//srv", "not canonical"),
    ("src1:/srv//x", "not canonical"),
    ("/srv/\x1b[31m", "control character"),
    ("-oProxyCommand=touch /tmp/x:/", "expected [user@]hostname or address"),
    ("my host:/", "expected [user@]hostname or address"),
    ("h$(id):/", "expected [user@]hostname or address"),
])
def test_location_parse_bad(value: str, why: str) -> None:
    with pytest.raises(UsageError) as ei:
        Location.parse(value)
    assert why in ei.value.message


# --- paths, hosts, tags ----------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["/var/cache/*", "/home/?", "/a[bc]", "/x\\y", "/srv/**"])
def test_plain_path_refuses_wildcards(value: str) -> None:
    with pytest.raises(UsageError, match="wildcards are not supported, name the directory"):
        model.plain_path(value, "-e/--exclude directory")


def test_plain_path_accepts_plain_dirs() -> None:
    assert model.plain_path("/var/cache/apt", "x") == "/var/cache/apt"
    assert model.plain_path("/srv/big data", "x") == "/srv/big data"
    with pytest.raises(UsageError, match="root directory is not allowed"):
        model.plain_path("/", "x")
    with pytest.raises(UsageError, match="must be an absolute path"):
        model.plain_path("var/cache", "x")


@pytest.mark.parametrize("value", ["node1", "node-1", "node1.cluster.example.org", "a", "N0DE", "1",
                                   "a" * 63, ".".join(["a" * 63] * 3) + "." + "a" * 61])
def test_hostname_good(value: str) -> None:
    assert model.hostname(value) == value


@pytest.mark.parametrize("value", ["", "-node", "node-", "no_de", "node 1", "node..x", ".node", "node.",
                                   "a" * 64, "node\n", "nöde", ".".join(["a" * 63] * 4),
                                   "x.-y"])
def test_hostname_bad(value: str) -> None:
    with pytest.raises(UsageError, match="invalid hostname"):
        model.hostname(value)


def test_host_refuses_leading_dash_even_with_user() -> None:
    for v in ("-x", "-x@host", "user@-host"):
        with pytest.raises(UsageError):
            model.host(v)
    assert model.host("user.name_1@host-1.example") == "user.name_1@host-1.example"


def test_tag_and_os_name() -> None:
    assert model.tag("x86_64", "architecture") == "x86_64"
    with pytest.raises(UsageError, match="invalid architecture 'x86 64'"):
        model.tag("x86 64", "architecture")
    assert model.os_name("Debian GNU 12.5") == "Debian GNU 12.5"
    with pytest.raises(UsageError, match="invalid operating system"):
        model.os_name("Debian/12")


# --- private directories -----------------------------------------------------------------------------

def test_private_dirs_good() -> None:
    assert model.private_dirs(["/var", "/etc/qrm"], ["/var/lib/apt", "/var/cache"]) == (
        ["/var", "/etc/qrm"], ["/var/lib/apt", "/var/cache"])
    assert model.private_dirs([], []) == ([], [])
    assert model.private_dirs(["/home"], []) == (["/home"], [])


@pytest.mark.parametrize(("adds", "excludes", "why"), [
    (["/proc"], [], "proc is not part of the image"),
    (["/proc/sys"], [], "proc is not part of the image"),
    (["/sys"], [], "sys is not part of the image"),
    (["/dev/shm"], [], "dev is not part of the image"),
    (["/run/lock"], [], "run is not part of the image"),
    ([], ["/var/cache"], "--private-exclude needs --private-add"),
    (["/var"], ["/var"], "not inside any --private-add directory (/var)"),
    (["/var"], ["/variable/x"], "not inside any --private-add directory (/var)"),
    (["/var", "/home"], ["/etc/x"], "not inside any --private-add directory (/var, /home)"),
    (["/my dir"], [], "must not contain white space"),
    (["/var"], ["/var/my cache"], "must not contain white space"),
    (["/var/"], [], "not canonical"),
    (["var"], [], "must be an absolute path"),
    (["/"], [], "root directory is not allowed"),
])
def test_private_dirs_bad(adds: list[str], excludes: list[str], why: str) -> None:
    with pytest.raises(UsageError) as ei:
        model.private_dirs(adds, excludes)
    assert why in ei.value.message


def test_private_add_similar_names_to_live_dirs_are_fine() -> None:
    assert model.private_dirs(["/procedures", "/system", "/devel", "/running"], []) == (
        ["/procedures", "/system", "/devel", "/running"], [])


# --- every component of a target path (issue 10, item 4) ---------------------------------------------

COMPONENT = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,254}")


@pytest.mark.parametrize(("value", "why"), [
    ("storage:/exports/x;touch /tmp/p/img", "component 'x;touch ' must be 1-255 ASCII letters"),
    ("nas1:/exports/my dir/img", "component 'my dir'"),
    ("nas1:/exports/-rf/img", "component '-rf'"),
    ("nas1:/exports/.img.qrmfs-staging-1/img", "component '.img.qrmfs-staging-1'"),
    ("nas1:/exports/$(id)/img", "component '$(id)'"),
    ("nas1:/exports/ünï/img", "component 'ünï'"),
    ("nas1:/exports/a%h/img", "component 'a%h'"),
    ("nas1:/ex ports/img", "component 'ex ports'"),
])
def test_target_every_component_obeys_the_rule(value: str, why: str) -> None:
    with pytest.raises(UsageError) as ei:
        Target.parse(value)
    assert why in ei.value.message
    assert ei.value.message.startswith(f"invalid path in target {value.split(':', 1)[1]!r}: ")


def test_target_url_spelling_suggests_the_path() -> None:
    with pytest.raises(UsageError) as ei:
        Target.parse("storage://exports/img")
    assert ei.value.message == ("invalid target 'storage://exports/img': STORAGE:/path, not a URL "
                                "(did you mean 'storage:/exports/img'?)")


def test_non_canonical_suggestion_is_a_single_slash_path() -> None:
    with pytest.raises(UsageError, match=r"not canonical \(write '/exports/img'\)"):
        model.abs_path("//exports//img/", "path")


@given(st.lists(st.from_regex(COMPONENT, fullmatch=True), min_size=1, max_size=4),
       st.from_regex(r"[A-Za-z0-9_]{1,50}", fullmatch=True))
def test_target_accepts_every_path_of_good_components(parents: list[str], name: str) -> None:
    path = "/" + "/".join([*parents, name])
    if any(c in (".", "..") for c in parents):
        return
    assert Target.parse(f"nas1:{path}").path == path


@given(st.lists(st.from_regex(COMPONENT, fullmatch=True), max_size=3),
       st.text(alphabet=st.characters(blacklist_characters="/"), max_size=12).filter(
           lambda c: not COMPONENT.fullmatch(c)),
       st.integers(0, 3))
def test_target_refuses_any_bad_component_anywhere(good: list[str], bad: str, at: int) -> None:
    parts = [*good]
    parts.insert(min(at, len(parts)), bad)
    value = "nas1:/" + "/".join([*parts, "img1"])
    with pytest.raises(UsageError) as ei:
        Target.parse(value)
    assert ei.value.exit_code == 2
    assert "\n" not in ei.value.message


@pytest.mark.parametrize(("url", "ok"), [
    ("http://qrm/openqrm", True), ("https://10.0.0.1:8443/openqrm", True), ("https://[fd00::1]/o", True),
    ("notaurl", False), ("qrm/openqrm", False), ("http://", False), ("file:///etc/passwd", False),
    ("http://u@qrm/openqrm", False), ("http://qrm/openqrm#x", False), ("http://qrm/o?", False),
    ("http://qrm:0x/o", False), ("http://q rm/o", False),
])
def test_openqrm_url(url: str, ok: bool) -> None:
    if ok:
        assert model.openqrm_url(url) == url
    else:
        with pytest.raises(UsageError, match="invalid openQRM URL"):
            model.openqrm_url(url)


@pytest.mark.parametrize(("value", "why"), [
    ("/srv/a:b", "has characters other than ASCII letters, digits and '_./+@-' (':'); qrmfs-init would skip it"),
    ("/var/lib/ünï", "has characters other than"),
    ("/.qrmfs/nodes", "cannot be per node"),
    ("/srv/a*", "has characters other than"),
])
def test_private_dir_refuses_what_qrmfs_init_would_skip(value: str, why: str) -> None:
    with pytest.raises(UsageError) as ei:
        model.private_dirs([value], [])
    assert why in ei.value.message
    assert model.private_dirs(["/srv/a+b@c_d.e-f"], []) == (["/srv/a+b@c_d.e-f"], [])
