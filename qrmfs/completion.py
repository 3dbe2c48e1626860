"""Shell completion of -t and -l from the config's storage servers and hosts (typer autocompletion callbacks).

The shell scripts themselves are typer's (`qrmfs --install-completion` / `--show-completion` for bash, zsh
and fish). These callbacks run inside a completion request: they must never fail or print, so any problem
with the config gives no suggestions.
"""

from __future__ import annotations

from typing import Any

from .config import Config, load


def _config(ctx: Any) -> Config | None:
    explicit = None
    if ctx is not None:
        explicit = (getattr(ctx, "params", None) or {}).get("config")
    try:
        return load(explicit)
    except Exception:  # a completion request must never fail
        return None


def complete_storage(ctx: Any, incomplete: str) -> list[tuple[str, str]]:
    """-t: `NAME:EXPORT_ROOT/` for each [storage.NAME] (help: its address)."""
    cfg = _config(ctx)
    if cfg is None:
        return []
    return [(f"{name}:{s.export_root}/", f"{s.ssh.dest}") for name, s in sorted(cfg.storage.items())
            if f"{name}:{s.export_root}/".startswith(incomplete) or name.startswith(incomplete)]


def complete_host(ctx: Any, incomplete: str) -> list[tuple[str, str]]:
    """-l: `NAME:/` for each [hosts.NAME] (help: its address)."""
    cfg = _config(ctx)
    if cfg is None:
        return []
    return [(f"{name}:/", h.dest) for name, h in sorted(cfg.hosts.items()) if f"{name}:/".startswith(incomplete)]


def complete_storage_name(ctx: Any, incomplete: str) -> list[tuple[str, str]]:
    """qrmfs list STORAGE: the [storage.NAME] names."""
    cfg = _config(ctx)
    if cfg is None:
        return []
    return [(name, s.ssh.dest) for name, s in sorted(cfg.storage.items()) if name.startswith(incomplete)]
