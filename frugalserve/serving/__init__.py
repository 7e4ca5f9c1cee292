"""Serving: the DataPlane and what it owns on the request path (admission, batching, metering)."""

from .dataplane import DataPlane
from .errors import (
    BadInput,
    DeadlineExceeded,
    InferenceError,
    ModelFailed,
    NotFound,
    Overloaded,
    PayloadTooLarge,
    Unavailable,
)
from .types import InferenceRequest, InferenceResponse

__all__ = [
    "BadInput",
    "DataPlane",
    "DeadlineExceeded",
    "InferenceError",
    "InferenceRequest",
    "InferenceResponse",
    "ModelFailed",
    "NotFound",
    "Overloaded",
    "PayloadTooLarge",
    "Unavailable",
]
