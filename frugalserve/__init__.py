"""frugalserve: serve ML models at the lowest cost that meets a latency and an accuracy target."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["__version__", "track_training"]

if TYPE_CHECKING:
    from .economics.training import track_training


def __getattr__(name: str) -> Any:
    # lazy: `import frugalserve` stays cheap (no SQLAlchemy, no YAML) for whoever only wants a
    # submodule, and `frugalserve.track_training` loads the ledger only when first touched
    if name == "track_training":
        from .economics.training import track_training

        return track_training
    raise AttributeError(f"module 'frugalserve' has no attribute {name!r}")
