"""Engines behind one small protocol. Each runtime loads one artifact file and predicts batches."""

from __future__ import annotations

from pathlib import Path

from .base import ModelLoadError, Runtime
from .onnx import OnnxRuntime
from .sklearn import SklearnRuntime

RUNTIMES: dict[str, type[Runtime]] = {r.name: r for r in (OnnxRuntime, SklearnRuntime)}


def runtime_for(version_dir: Path, name: str | None = None) -> type[Runtime]:
    """The runtime named in the config, or the one whose artifact file is in the version folder."""
    if name is not None:
        try:
            return RUNTIMES[name]
        except KeyError:
            raise ModelLoadError(
                f"unknown runtime {name!r}; known: {', '.join(sorted(RUNTIMES))}"
            ) from None
    for runtime in RUNTIMES.values():
        if (version_dir / runtime.filename).exists():
            return runtime
    files = ", ".join(r.filename for r in RUNTIMES.values())
    raise ModelLoadError(f"{version_dir}: no model file (expected one of: {files})")


__all__ = ["RUNTIMES", "ModelLoadError", "Runtime", "runtime_for"]
