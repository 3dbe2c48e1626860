"""The storage server as qrmfs sees it (side.py, the typed operations), and what runs them: the agent's
payload, its session, the session's pipelined answers, agents started early (one module each)."""

from .payload import node_init_script
from .side import Op, StorageSide, Supervised

__all__ = ["Op", "StorageSide", "Supervised", "node_init_script"]
