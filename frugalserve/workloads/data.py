"""What the workloads share about their data: the error for a data package that is not
installed, finding a file an installed distribution ships, and top-1 accuracy on a split."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path
from typing import Protocol

import numpy as np


class DatasetMissing(FileNotFoundError):
    """A data or weights package is not installed; the message says how to install it."""


class Labelled(Protocol):
    @property
    def y(self) -> np.ndarray: ...


def package_file(distribution: str, relative: str, install: str) -> Path:
    """A file shipped by an installed distribution, found through its metadata (some, like
    the MiniLM-L3 one, install a folder that is not an importable module). DatasetMissing,
    saying `install`, when the distribution or the file is not there."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise DatasetMissing(f"{distribution} is not installed: `{install}`") from None
    for f in dist.files or ():
        if str(f).replace("\\", "/").endswith(relative):
            path = Path(str(dist.locate_file(f)))
            if path.exists():
                return path
    raise DatasetMissing(f"{distribution} is installed but has no {relative}: reinstall it "
                         f"with `{install}`")


def accuracy(predicted: np.ndarray, split: Labelled) -> float:
    """Share of `split`'s rows whose label is the predicted one."""
    return float((np.asarray(predicted).reshape(-1) == split.y).mean())
