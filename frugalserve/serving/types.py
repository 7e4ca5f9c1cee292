"""The protocol-agnostic request and response the DataPlane speaks.

Plain slotted dataclasses: building one per request must cost next to nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

ANONYMOUS = "anonymous"


@dataclass(slots=True)
class InferenceRequest:
    model: str
    inputs: dict[str, np.ndarray]
    version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    outputs: list[str] | None = None  # requested output names; None: all
    tenant: str = ANONYMOUS
    timeout_s: float | None = None  # the request's own queue deadline
    # admission's budget reservation (serving.admission): the counters charged, and the
    # estimate reserved against them until the request settles
    budget: tuple | None = None
    reserved: int = 0
    tier: str | None = None  # the plan tier that serves it (the API key's); None: the default


@dataclass(slots=True)
class InferenceResponse:
    model_name: str
    model_version: str
    outputs: dict[str, np.ndarray]
    id: str | None
    parameters: dict[str, Any]
    cost_pusd: int
    queue_s: float
    compute_s: float
    batch_size: int
    variant: str = "reference"  # the variant path that answered: "int8>reference"
