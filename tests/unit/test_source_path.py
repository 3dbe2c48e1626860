"""A -l source path that does not exist is refused before anything starts, in one line (issue 26): it was found
only by the copy (a tar stream, a warning that rsync repairs the copy, an rsync run, rsync's three lines).
Real qrmfs runs, a local source and a local storage server (no docker)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from qrmfs.transfer import Streamed


def test_a_source_path_that_does_not_exist_is_refused_in_one_line_before_anything(tmp_path: Path) -> None:
    root, src = tmp_path / "exports", tmp_path / "src"
    root.mkdir()
    (src / "etc").mkdir(parents=True)
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'spool_dir = "{tmp_path / "spool"}"\n[storage.local]\naddress = "local"\n'
                   f'export_root = "{root}"\n')
    env = {**os.environ, "HOME": str(tmp_path), "QRMFS_PASSWORD": ""}
    for missing in (tmp_path / "nonexistent", src / "etc/hostname-not-a-dir"):
        r = subprocess.run([sys.executable, "-m", "qrmfs", "create", "-t", f"local:{root}/img1", "-l", str(missing),
                            "-o", "--config", str(cfg)], capture_output=True, text=True, env=env, timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.splitlines() == [f"qrmfs: error: the source path {missing} is not a directory on this "
                                         "machine"]
        assert os.listdir(root) == []  # no staging copy, no lock file: nothing started


def test_a_tar_streams_warning_names_tars_own_error_not_its_closing_line() -> None:
    s = Streamed((2, 0), None, 0, "tar: /srv/x: Cannot open: Permission denied\n"
                                  "tar: Exiting with failure status due to previous errors\n")
    assert s.why() == "sending tar exited with 2: tar: /srv/x: Cannot open: Permission denied"
