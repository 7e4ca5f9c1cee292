"""Engines behind one small protocol. Each runtime loads one artifact file and predicts batches."""

from __future__ import annotations

from pathlib import Path

from .base import ModelLoadError, Runtime
from .onnx import OnnxRuntime
from .sklearn import SklearnRuntime
from .text import TextRuntime

# the order `runtime_for` asks them in: the text runtime's folder (model.onnx + tokenizer.json)
# is also an ONNX runtime's folder, so the more specific runtime comes first
RUNTIMES: dict[str, type[Runtime]] = {
    r.name: r for r in (TextRuntime, OnnxRuntime, SklearnRuntime)
}


def runtime_for(version_dir: Path, name: str | None = None) -> type[Runtime]:
    """The runtime named in the config, or the first whose artifact is in the version folder."""
    if name is not None:
        try:
            return RUNTIMES[name]
        except KeyError:
            raise ModelLoadError(
                f"unknown runtime {name!r}; known: {', '.join(sorted(RUNTIMES))}"
            ) from None
    for runtime in RUNTIMES.values():
        if runtime.detect(version_dir):
            return runtime
    files = ", ".join(dict.fromkeys(r.filename for r in RUNTIMES.values()))
    raise ModelLoadError(f"{version_dir}: no model file (expected one of: {files})")


__all__ = ["RUNTIMES", "ModelLoadError", "Runtime", "runtime_for"]
