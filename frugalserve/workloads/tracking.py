"""Training runs of the workloads' models, recorded in the ledger with what they cost.

Each workload wraps the training of one model in `tracked(...)`: with a ledger URL it is
economics' `track_training` (measured wall and CPU time, peak memory, priced by the rate card);
without one nothing is recorded, so calling a workload from a library or a test never writes a
ledger file into the working directory.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from decimal import Decimal
from typing import Any

from ..economics.training import TrainingRun, track_training

# The rate card's 2-vCPU instance, held whole: the workloads train on one or two threads (the
# same instance type their config.yaml serves them on, there at a share of it).
DEVICE = "aws-c7i.large"
VERSION = "1"


class Untracked:
    """What `tracked` yields without a ledger: the same attributes, nothing recorded."""

    def __init__(self, params: dict[str, Any] | None) -> None:
        self.params: dict[str, Any] = dict(params or {})
        self.record: TrainingRun | None = None
        self.id: int | None = None


def tracked(model: str, ledger_url: str | None, params: dict[str, Any] | None = None,
            notes: str | None = None, version: str = VERSION,
            device: str = DEVICE) -> AbstractContextManager[Any]:
    """`with tracked(...) as run:` around one model's training; `run.params` may be added to
    inside, `run.id` and `run.record` (None without a ledger) read after."""
    if ledger_url is None:
        return nullcontext(Untracked(params))
    return track_training(model, version, device, ledger_url=ledger_url, params=params,
                          notes=notes)


def cost_usd(run: Any) -> Decimal | None:
    """The recorded run's cost, None when nothing was recorded."""
    record = getattr(run, "record", None)
    return None if record is None else record.cost_usd
