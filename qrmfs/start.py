"""qrmfs's entry point. While Python loads qrmfs (a few hundred ms, before anything is done), SIGINT and SIGTERM
end it at once, saying so, with the documented exit code; from main() on, the CLI's own handler stops a run
in order (cli._stop_on_signals)."""

from __future__ import annotations


def entry() -> None:
    import os
    import signal
    import sys

    def before_start(signum: int, _frame: object) -> None:
        sys.stderr.write(f"qrmfs: interrupted by {signal.Signals(signum).name} (before anything was done)\n")
        os._exit(128 + signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, before_start)
    from .cli import entry as run

    run()
