"""The agent's operations, each declared once (protocol.Request): every one has its request, its answer, a
handler the agent finds and a client method in StorageSide; a request the agent cannot dispatch is answered
bad_request and the session goes on."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from qrmfs import storage as S
from qrmfs.agent import main
from qrmfs.agent import protocol as P
from qrmfs.config import SshHost, Storage
from qrmfs.errors import StorageError
from qrmfs.pending import Pending
from qrmfs.runner import Runner
from qrmfs.storage import Op, StorageSide

SESSION_OPS = {"lock", "unlock", "serve", "run"}  # served by main.py's framing itself


@pytest.mark.parametrize("op", sorted(P.REQUESTS))
def test_every_op_has_its_request_answer_and_handler(op: str) -> None:
    cls = P.REQUESTS[op]
    assert cls.op == op and dataclasses.is_dataclass(cls) and dataclasses.is_dataclass(cls.answer)
    if cls.handler == P.SESSION:
        assert op in SESSION_OPS
        with pytest.raises(P.AgentError, match="cannot run inside a session"):  # never an ordinary handler
            main.dispatch(_blank(cls))
    else:
        fn = main.handler(cls)  # raises bad_request when it is missing or does not take the request's fields
        assert fn.__name__ == cls.handler.partition(".")[2]


def _blank(cls: type[Any]) -> Any:
    """A request of cls with every field that has no default set to a placeholder (never sent)."""
    return cls(**{f.name: None for f in dataclasses.fields(cls)
                  if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING})


class _Recorder(StorageSide):
    """A StorageSide that records the requests its methods would send, and sends none."""

    def __init__(self) -> None:
        super().__init__(Storage("rec", SshHost("local"), "/exports"), Runner())
        self.sent: list[str] = []

    def _begin(self, req: P.Request[Any]) -> Pending[Any]:
        self.sent.append(req.op)
        return Pending.done(req.op, None)

    def stop_at_payload(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """What starts an agent records the request it would carry, and stops there."""
        def payload(req: P.Request[Any] | None) -> str:
            if req is not None:
                self.sent.append(req.op)
            raise _Stop
        monkeypatch.setattr(S.payload, "payload", payload)


class _Stop(Exception):
    pass


def test_every_op_has_a_client_method(monkeypatch: pytest.MonkeyPatch) -> None:
    """Op(P.X) in StorageSide for a request of (path, export_root, ...); the others are sent by a method of
    their own, called here (a new one that sends another request is listed here)."""
    derived = {attr.op for attr in vars(StorageSide).values() if isinstance(attr, Op)}
    side = _Recorder()
    side.stop_at_payload(monkeypatch)
    side.list()
    side.start_check("/exports/a", P.Options("a"))
    side.rebase("/exports/a", "/exports/.a.s", {"x"})
    side.start_rebase_scan("/exports/a", "/exports/.a.s")
    side.storage = dataclasses.replace(side.storage, exports="kernel", export_clients="10.0.0.5")
    side.export("/exports/a", "show")  # the side's config says how it is exported
    with side.lock("/exports/a", "me"):
        pass
    for start in (side.connect, lambda: side.supervised("/exports/a", ["true"], None)):
        with pytest.raises(_Stop):
            start()
    assert derived | set(side.sent) == set(P.REQUESTS)


def test_an_op_method_sends_its_request_with_the_sides_export_root() -> None:
    side = _Recorder()
    sent: list[P.Request[Any]] = []

    def begin(req: P.Request[Any]) -> Pending[Any]:
        sent.append(req)
        return Pending.done(req.op, "answer")
    side._begin = begin  # type: ignore[method-assign]
    assert side.stats("/exports/a", root="/exports/.a.s") == "answer"
    assert sent == [P.Stats("/exports/a", "/exports", "/exports/.a.s")]


def test_two_requests_cannot_declare_one_op() -> None:
    with pytest.raises(TypeError, match="both declare the operation 'stats'"):
        @dataclasses.dataclass(frozen=True)
        class Stats2(P.Request[P.Counts]):
            op = "stats"
            answer = P.Counts
            handler = "tree.op_stats"
    assert P.REQUESTS["stats"] is P.Stats


# --- a request the agent cannot dispatch, through a real agent session --------------------------------------

@pytest.fixture
def broken_agent(monkeypatch: pytest.MonkeyPatch) -> None:
    """The agent as shipped, but `stats` names a handler it does not have and `manifest_update` one that does not
    take its fields (an agent of another version): what the session's requests travel to is this text."""
    sources = [(name, text.replace('"tree.op_stats"', '"tree.op_nothing"')
                .replace('"tree.op_manifest_update"', '"tree.op_stats"'))
               for name, text in S.payload.agent_sources()]
    assert sources != S.payload.agent_sources()
    monkeypatch.setattr(S.payload, "agent_sources", lambda: sources)
    monkeypatch.setattr(S.payload, "sources_key", lambda: "broken-agent-test")


@pytest.fixture
def raw(side: StorageSide) -> Iterator[Callable[[str], dict[str, Any]]]:
    """One line to the side's real agent session, its answer line back (queued as the side queues a request's:
    the session's reader thread hands each answer to the oldest request waiting)."""
    session = side.session
    with session.io:
        p = session.live()

    def ask(line: str) -> dict[str, Any]:
        with session.io:
            slot = session.answers.expect()
            S.payload.write(p, line.encode() + b"\n")
            answer: dict[str, Any] = json.loads(session.answers.wait(slot))
        return answer
    yield ask
    assert session.process is p  # the session lived through it all


BAD = {
    "unknown op": '{"op": "explode", "args": {}}',
    "no op": '{"args": {}}',
    "not JSON": "inspect please",
    "JSON, not an object": '["inspect"]',
    "args not an object": '{"op": "inspect", "args": "/x"}',
    "a field of the wrong type": '{"op": "inspect", "args": {"path": 1, "export_root": "/x"}}',
    "a missing field": '{"op": "inspect", "args": {"path": "/x/a"}}',
    "an unknown field": '{"op": "inspect", "args": {"path": "/x/a", "export_root": "/x", "mode": 1}}',
    "an options field of the wrong type": '{"op": "check", "args": {"path": "/x/a", "export_root": "/x", '
                                          '"options": {"image": "a", "shared": "yes"}}}',
    "a session's own op": '{"op": "serve", "args": {}}',
    "a streaming op": '{"op": "run", "args": {"path": "/x/a", "export_root": "/x", "argv": ["true"]}}',
}


def test_requests_the_agent_cannot_dispatch_are_bad_requests_and_the_session_goes_on(
        broken_agent: None, side: StorageSide, root: Path, raw: Callable[[str], dict[str, Any]]) -> None:
    path, export = str(root / "img"), str(root)
    bad = dict(BAD)
    bad["an op without its handler"] = json.dumps({"op": "stats", "args": {"path": path, "export_root": export}})
    bad["a handler that does not take its fields"] = json.dumps(
        {"op": "manifest_update", "args": {"path": path, "export_root": export, "patch": {}}})
    for what, line in bad.items():
        answer = raw(line)
        assert answer["ok"] is False and answer["error"]["kind"] == "bad_request", what
    assert "no handler for stats (tree.op_nothing)" in raw(bad["an op without its handler"])["error"]["message"]
    valid = raw(json.dumps({"op": "inspect", "args": {"path": path, "export_root": export}}))
    assert valid["ok"] is True and valid["result"]["exists"] is False
    assert side.inspect(path).parent_exists  # the typed client goes on on the same session
    with pytest.raises(StorageError, match="no handler for stats"):
        side.stats(path)
    assert side.inspect(path).exists is False
