"""qrmfs/cli.py through qrmfs.cli.main([...]): exit codes, the one-line error, --json, create --dry-run."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from qrmfs import cli


@pytest.fixture
def env(tmp_path: Path, isolated_home: Path) -> dict[str, Path]:
    """An isolated HOME, no $QRMFS_CONFIG, and a config with a `local` storage server below tmp_path."""
    root = tmp_path / "exports"
    src = tmp_path / "src"
    (src / "etc").mkdir(parents=True)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'spool_dir = "{tmp_path}/spool"\n\n[storage.local]\naddress = "local"\n'
                   f'export_root = "{root}"\nstorage_id = 3\n\n[openqrm]\nurl = "http://127.0.0.1:9/openqrm"\n'
                   'user = "openqrm"\ndeployment_id = 2\n')
    return {"tmp": tmp_path, "root": root, "src": src, "cfg": cfg}


def run(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(args)
    out, err = capsys.readouterr()
    return code, out, err


def create_args(env: dict[str, Path], **over: str) -> list[str]:
    a = {"-t": f"local:{env['root']}/img1", "-l": str(env["src"])}
    a.update(over)
    out = ["create"]
    for k, v in a.items():
        out += [k, v]
    return [*out, "-o", "--config", str(env["cfg"])]


def tree_of(base: Path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, n), base) for d, ds, fs in os.walk(base) for n in ds + fs)


# --- bad values: exit 2, one line ---------------------------------------------------------------------

BAD = [
    ({"-s": "bad-name"}, "qrmfs: error: invalid image name 'bad-name': use 1-50 letters, digits and '_' only"),
    ({"-s": "img2"}, "qrmfs: error: image name 'img2' and target '{target}' disagree: the target must end in /img2"),
    ({"-t": "nas1"}, "qrmfs: error: invalid target 'nas1': expected STORAGE:/full/path/IMAGE_NAME"),
    ({"-t": "local:{root}/img-1"}, "qrmfs: error: invalid image name in target (its last path component) 'img-1': "
                                   "use 1-50 letters, digits and '_' only"),
    ({"-t": "local:{root}/../img1"}, "qrmfs: error: invalid path in target '{root}/../img1': not canonical "
                                     "(write '{tmp}/img1')"),
    ({"-t": "local:/elsewhere/img1"}, "qrmfs: error: target local:/elsewhere/img1 is not below the export root "
                                      "{root} of storage server local"),
    ({"-l": "relative/dir"}, "qrmfs: error: invalid location 'relative/dir': expected HOST:/rootfs or an absolute "
                             "local directory"),
    ({"-l": "-oProxyCommand=x:/"}, "qrmfs: error: invalid source host '-oProxyCommand=x': expected "
                                   "[user@]hostname or address"),
    ({"--hostname": "node_1"}, "qrmfs: error: invalid hostname 'node_1': letters, digits, '-' and '.', "
                               "labels of 1-63"),
    ({"-e": "/var/cache/*"}, "qrmfs: error: invalid -e/--exclude directory '/var/cache/*': wildcards are not "
                             "supported, name the directory"),
    ({"-e": "var/cache"}, "qrmfs: error: invalid -e/--exclude directory 'var/cache': must be an absolute path"),
    ({"--private-exclude": "/var/x"}, "qrmfs: error: --private-exclude needs --private-add: it names directories "
                                      "inside private ones"),
    ({"--private-add": "/proc/x"}, "qrmfs: error: invalid --private-add '/proc/x': proc is not part of the image"),
    ({"--route": "ftp"}, "qrmfs: error: invalid --route 'ftp': use ssh or nfs"),
    ({"-a": "x86 64"}, "qrmfs: error: invalid architecture 'x86 64': 1-32 of letters, digits, '_', '.', '+', '-'"),
]


@pytest.mark.parametrize(("over", "want"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_values_exit_2_with_one_line(env: dict[str, Path], capsys: pytest.CaptureFixture[str],
                                         over: dict[str, str], want: str) -> None:
    fmt = {"root": env["root"], "tmp": env["tmp"], "target": f"local:{env['root']}/img1"}
    over = {k: v.format(**fmt) for k, v in over.items()}
    before = tree_of(env["tmp"])
    code, out, err = run(create_args(env, **over), capsys)
    assert code == 2
    assert err.splitlines() == [want.format(**fmt)]
    assert out == ""
    assert tree_of(env["tmp"]) == before


def test_missing_option_is_a_usage_error(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["create", "-l", "/", "--config", str(env["cfg"])], capsys)
    assert code == 2
    assert "Missing option '-t' / '--target'" in err
    assert err.startswith("Usage: qrmfs create ")


def test_unknown_option_is_a_usage_error(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run([*create_args(env), "--frobnicate"], capsys)
    assert code == 2
    assert "No such option: --frobnicate" in err


def test_missing_config_file_exit_3(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["create", "-t", "nas:/exports/i", "-l", "/", "-o", "--config",
                          str(env["tmp"] / "nope.toml")], capsys)
    assert code == 3
    assert err.splitlines() == [f"qrmfs: error: config file {env['tmp'] / 'nope.toml'} not found"]


def test_a_mistyped_config_key_exit_3_one_line_nothing_written(env: dict[str, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """`exportroot` for export_root: the default /exports would be used silently; qrmfs refuses instead."""
    env["cfg"].write_text(env["cfg"].read_text().replace("export_root", "exportroot"))
    before = tree_of(env["tmp"])
    code, out, err = run(create_args(env), capsys)
    assert code == 3
    assert err.splitlines() == ["qrmfs: error: config: unknown key 'exportroot' in [storage.local]; "
                                "did you mean 'export_root'?"]
    assert out == ""
    assert tree_of(env["tmp"]) == before


# --- --json -----------------------------------------------------------------------------------------

def test_json_error_output(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run([*create_args(env, **{"--hostname": "bad_host"}), "--json"], capsys)
    assert code == 2
    assert json.loads(out) == {"schema": 1, "ok": False, "command": "create", "error": {
        "kind": "usage", "exit_code": 2, "message": "invalid hostname 'bad_host': letters, digits, '-' and '.', "
                                                    "labels of 1-63", "detail": ""}}
    assert err.splitlines()[0].startswith("qrmfs: error: invalid hostname")


def test_json_config_error(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["create", "-t", "n:/exports/i", "-l", "/", "--json", "--config", str(env["tmp"] / "x")],
                       capsys)
    assert code == 3
    assert json.loads(out)["error"]["exit_code"] == 3
    assert json.loads(out)["error"]["kind"] == "config"


def test_json_error_output_for_click_usage_errors(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["create", "-l", "/", "--json", "--config", str(env["cfg"])], capsys)
    assert code == 2
    assert json.loads(out)["error"]["exit_code"] == 2


# --- create --dry-run ---------------------------------------------------------------------------------

def test_create_dry_run_prints_rsync_argv_and_changes_nothing(env: dict[str, Path],
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    before = tree_of(env["tmp"])
    code, out, err = run([*create_args(env, **{"-e": "/var/cache"}), "--dry-run"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    root, src = env["root"], env["src"]
    assert lines[0] == f"dry run: create img1 at local:{root}/img1 from {src} (route ssh)"
    assert lines[1] == f"  staging: {root}/.img1.qrmfs-staging-<id>"
    assert lines[2] == "  copy root filesystem on local:"
    assert shlex.split(lines[3]) == [
        "rsync", "-aHAXS", "--numeric-ids", "--one-file-system", "--stats", "--filter=-xs system.*",
        "--filter=-xr system.*", "--filter=-xs trusted.SGI_*", "--filter=-xr trusted.SGI_*", "--exclude=/proc/*",
        "--exclude=/sys/*",
        "--exclude=/dev/*", "--exclude=/run/*", "--exclude=/tmp/*", "--exclude=/mnt/*", "--exclude=/media/*",
        "--exclude=/lost+found", "--exclude=/swapfile", "--exclude=/.qrmfs/nodes", "--exclude=/var/cache",
        f"{src}/", f"{root}/.img1.qrmfs-staging-<id>/"]
    assert "  preparation:" in lines
    assert "    dirs: empty proc, sys, run; dev; tmp with mode 1777; mnt/floppy and mnt/cdrom" in lines
    assert "  openQRM: nothing sent" in lines
    assert lines[-1] == "nothing was changed"
    assert tree_of(env["tmp"]) == before  # no export root, no staging, no spool, no lock


def test_create_dry_run_json_without_password(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    args = ["create", "-t", f"local:{env['root']}/img1", "-l", str(env["src"]), "-u", "openqrm",
            "-p", "Sup3rS3cret", "--dry-run", "--json", "--config", str(env["cfg"])]
    before = tree_of(env["tmp"])
    code, out, err = run(args, capsys)
    assert code == 0, err
    assert "Sup3rS3cret" not in out + err
    envelope = json.loads(out)
    assert (envelope["schema"], envelope["ok"], envelope["command"]) == (1, True, "create")
    plan = envelope["result"]
    assert (plan["dry_run"], plan["image"], plan["target"], plan["route"]) == (
        True, "img1", f"local:{env['root']}/img1", "ssh")
    assert [c["argv"][-2:] for c in plan["copies"]] == [[f"{env['src']}/",
                                                        f"{env['root']}/.img1.qrmfs-staging-<id>/"]]
    regs = [(r["url"], r["params"].get("image_command") or r["params"]["event_priority"]) for r in
            plan["registration"]]
    assert regs == [("http://127.0.0.1:9/openqrm/action/resource-monitor.php", "9"),
                    ("http://127.0.0.1:9/openqrm/base/server/image/image-action.php", "new_image"),
                    ("http://127.0.0.1:9/openqrm/action/resource-monitor.php", "10")]
    assert tree_of(env["tmp"]) == before


def test_create_dry_run_text_argv_is_shell_quoted(env: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run([*create_args(env, **{"-e": "/opt/big dir"}), "--dry-run"], capsys)
    assert code == 0
    line = [ln for ln in out.splitlines() if ln.startswith("    rsync ")][0]
    assert "--exclude=/opt/big dir" in shlex.split(line)


def test_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(["create", "--help"], capsys)
    assert code == 0
    assert "--filesystem-image" in out and "--dry-run" in out


@pytest.mark.parametrize("args,code", [(["--version"], 0), (["validate", "-t", "no-colon"], 3)])
def test_entry_runs_the_clean_up_then_ends_with_the_commands_code_and_all_its_output(args: list[str], code: int,
                                                                                     tmp_path: Path) -> None:
    """entry() ends the process without the interpreter's slow teardown: what qrmfs registered to run at exit
    (its connections, its ssh-agent) still runs, and nothing written to stdout or stderr is lost."""
    import subprocess
    import sys

    prog = ("import atexit, sys\n"
            "from qrmfs import cli\n"
            "atexit.register(lambda: print('clean-up ran', file=sys.stderr))\n"
            f"sys.argv = ['qrmfs', *{args!r}]\n"
            "cli.entry()\n")
    r = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "QRMFS_CONFIG": str(tmp_path / "none.toml")})  # 3: no such config
    assert r.returncode == code, r.stderr
    assert r.stderr.rstrip().endswith("clean-up ran")
    if code == 0:
        assert r.stdout.startswith("qrmfs ")
    else:
        assert "qrmfs: error:" in r.stderr
