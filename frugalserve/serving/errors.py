"""Errors the core raises; each protocol maps them to its own status codes."""

from __future__ import annotations


class InferenceError(Exception):
    """Base of every error a client can be told about. `status` is the HTTP-style code the
    usage record keeps, so the ledger speaks one language whatever the protocol."""

    status = 500


class BadInput(InferenceError):
    status = 400


class NotFound(InferenceError):
    status = 404


class PayloadTooLarge(InferenceError):
    status = 413


class ModelFailed(InferenceError):
    status = 500


class Unavailable(InferenceError):
    """Loading, unloading or shutting down: try again shortly."""

    status = 503

    def __init__(self, message: str, retry_after_s: int = 1):
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Overloaded(Unavailable):
    """The model's queue is full: shed now rather than queue beyond any deadline."""


class DeadlineExceeded(InferenceError):
    """The request's own timeout passed while it waited in the queue."""

    status = 504


class Unauthorized(InferenceError):
    """No API key where one is required, or a wrong or revoked one."""

    status = 401


class Forbidden(InferenceError):
    """A valid key that may not do this (an admin route without an admin key)."""

    status = 403


class BudgetExceeded(InferenceError):
    """A budget's reject threshold would be passed: HTTP 402 Payment Required."""

    status = 402
