"""The lab's reading of the real openQRM server: `mariadb --batch` output and apache's access log."""

from __future__ import annotations

import time
from typing import Any

import pytest

from lab import openqrm
from lab.images import LabError


class FakeContainer:
    """What docker's exec_run returns, one answer per call (the container itself is the real one in e2e)."""

    def __init__(self, code: int, *outs: Any) -> None:
        self.code, self.outs = code, list(outs)
        self.argv: list[str] = []
        self.calls = 0

    def exec_run(self, argv: list[str], demux: bool = False) -> tuple[int, Any]:
        self.argv, self.calls = argv, self.calls + 1
        return self.code, self.outs.pop(0)


END = b"qrmfs_lab_end_of_output\n1\n"


def test_batch_output_becomes_rows_with_nulls_and_escapes():
    text = "image_id\timage_name\timage_comment\n0\topenqrm\tNULL\n17\ta\\tb\tline\\nnext \\\\ end\n"
    assert openqrm.parse_batch(text) == [
        {"image_id": "0", "image_name": "openqrm", "image_comment": None},
        {"image_id": "17", "image_name": "a\tb", "image_comment": "line\nnext \\ end"}]
    assert openqrm.parse_batch("") == [] and openqrm.parse_batch("a\tb\n") == []


def test_sql_runs_in_the_openqrm_database_and_a_failure_says_which_query():
    c = FakeContainer(0, (b"x\n1\n" + END, b""))
    assert openqrm.sql(c, "SELECT 1 AS x;") == [{"x": "1"}]
    assert c.argv[:2] == ["mariadb", "--batch"] and c.argv[-3:-1] == ["openqrm", "-e"]
    assert c.argv[-1] == "SELECT 1 AS x; SELECT 1 AS qrmfs_lab_end_of_output"
    with pytest.raises(LabError, match="'SELECT nope' failed .*Unknown column"):
        openqrm.sql(FakeContainer(1, (b"", b"ERROR 1054: Unknown column 'nope'")), "SELECT nope")


def test_a_read_whose_output_came_back_cut_is_asked_again_and_a_write_is_not():
    c = FakeContainer(0, (b"", b""), (b"x\n", b""), (b"x\n1\n" + END, b""))
    assert openqrm.sql(c, "select 1 AS x") == [{"x": "1"}] and c.calls == 3
    w = FakeContainer(0, (b"", b""))
    assert openqrm.sql(w, "UPDATE image_info SET image_isactive=1") == [] and w.calls == 1
    assert openqrm.sql(FakeContainer(0, (END, b"")), "DELETE FROM event_info") == []
    with pytest.raises(LabError, match="came back cut 5 times"):
        openqrm.sql(FakeContainer(0, *[(b"", b"")] * 5), "SELECT 1")


def test_ids_are_allocated_as_openqrm_does():
    before = int(time.time())
    i = openqrm.new_id()
    assert len(str(i)) == 14 and before * 10000 <= i <= (int(time.time()) + 1) * 10000
    assert openqrm.quote("it's \\ x") == "'it''s \\\\ x'" and openqrm.quote(5) == "5"


def test_the_access_log_shows_method_path_query_status_and_user():
    log = (b'172.21.0.4 - openqrm [05/Dec/2026:13:41:46 +0000] "GET /openqrm/base/server/image/image-action.php'
           b'?image_command=new_image&image_name=a%20b&x=1&x=2 HTTP/1.1" 200 198 "-" "python-httpx/0.28"\n'
           b'172.21.0.1 - - [05/Dec/2026:13:41:47 +0000] "GET /openqrm/action/resource-monitor.php HTTP/1.1" 500 '
           b'- "-" "-"\nnot a log line\n')
    assert openqrm.requests(FakeContainer(0, log)) == [
        {"method": "GET", "path": "/openqrm/base/server/image/image-action.php",
         "query": {"image_command": "new_image", "image_name": "a b", "x": "2"}, "status": 200, "user": "openqrm"},
        {"method": "GET", "path": "/openqrm/action/resource-monitor.php", "query": {}, "status": 500, "user": None}]


def test_the_database_is_only_started_or_stopped():
    with pytest.raises(LabError, match="unknown action 'drop'"):
        openqrm.database(FakeContainer(0, b""), "drop")
    with pytest.raises(LabError, match="stop failed: still answers"):
        openqrm.database(FakeContainer(1, b"still answers"), "stop")
