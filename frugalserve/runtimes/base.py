"""The runtime protocol: load an artifact, say its signature, predict a batch."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..tensors import TensorSpec


class ModelLoadError(Exception):
    """An artifact cannot be loaded; the message names the file and the problem."""


class Runtime(ABC):
    """One loaded model version. `predict` is called from a worker thread, one batch at a time
    per instance; engines should release the GIL while they compute."""

    name: ClassVar[str]
    filename: ClassVar[str]
    # True when predict computes only on its calling thread (one intra-op thread, on the CPU):
    # then that thread's CPU time, not the wall time, is the device time a batch used
    single_threaded: bool = False

    def __init__(self, path: Path, options: dict[str, Any]):
        self.path = path
        self.options = options

    @classmethod
    def detect(cls, folder: Path) -> bool:
        """Whether `folder` holds this runtime's artifact (`runtime_for` asks each in turn)."""
        return (folder / cls.filename).exists()

    @abstractmethod
    def signature(self) -> tuple[list[TensorSpec], list[TensorSpec]]:
        """Inputs and outputs as the artifact declares them (batch axis first, -1 for any)."""

    @abstractmethod
    def predict(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Outputs for a batch; every output's first axis matches the inputs' first axis."""

    def close(self) -> None:  # noqa: B027 - most engines free themselves when dropped
        """Release engine resources."""
