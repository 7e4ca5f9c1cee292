"""`frugalserve demo`: train two Fashion-MNIST classifiers, serve them, load them, price them.

Everything happens in this process: the server (the same one `frugalserve serve` runs) on a
background thread with its own event loop, the load generator on the main thread. Both share
two cores and one GIL, so the numbers show the shape of the economics (batching, utilization,
cost per prediction), not a peak benchmark.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import numpy as np
from rich.console import Console

from . import loadgen, v2_client
from .app import ServerSettings, ServerThread
from .economics.ledger import open_engine, sqlite_url
from .economics.ratecard import RateCard
from .economics.summary import ModelUsage, model_usage
from .progress import new_progress
from .workloads import fashion_mnist
from .workloads.onnx_export import INPUT_NAME

LEDGER_FILE = "ledger.db"


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("runs/demo")
    duration_s: float = 10.0  # closed loop per model; the open loop runs half as long
    concurrency: int = 32
    open_fraction: float = 0.4  # open-loop rate as a share of the closed-loop throughput
    connections: int = 64  # open loop: connection pool


@dataclass(frozen=True)
class Phase:
    """One load run against one model, as the client saw it and as the ledger priced it."""

    model: str
    load: loadgen.LoadSummary
    ledger: ModelUsage
    wall_s: float
    usd_per_hour: Decimal | None  # the device's price, for the provisioned (busy + idle) cost

    def provisioned_per_1k_usd(self) -> Decimal | None:
        if self.usd_per_hour is None:
            return None
        return self.ledger.provisioned_per_1k_usd(self.usd_per_hour, self.wall_s)


@dataclass(frozen=True)
class DemoResult:
    models: list[fashion_mnist.ReferenceModel]
    phases: list[Phase]
    workdir: Path
    elapsed_s: float


def run_demo(config: DemoConfig, console: Console | None = None) -> DemoResult:
    t0 = time.perf_counter()
    workdir = config.workdir
    repository = workdir / "repository"
    ledger_url = sqlite_url(workdir / LEDGER_FILE)
    workdir.mkdir(parents=True, exist_ok=True)
    runs: list[tuple[str, loadgen.LoadResult]] = []
    with new_progress(console) as progress:
        task = progress.add_task("load Fashion-MNIST", total=1)
        data = fashion_mnist.load()
        progress.update(task, completed=1, description=f"load Fashion-MNIST ({len(data.train):,}"
                        f" train, {len(data.validation):,} val, {len(data.test):,} test)")
        models = fashion_mnist.build_repository(repository, data, progress)
        bodies = [v2_client.infer_body({INPUT_NAME: data.test.x[i:i + 1]}, ["label"])
                  for i in range(len(data.test))]
        check = label_check(data.test.y)
        task = progress.add_task("start server", total=1)
        settings = ServerSettings(repository, ledger_url, poll_interval_s=None)
        with ServerThread(settings) as server:
            progress.update(task, completed=1, description=f"server on {server.url}")
            for model in models:
                url = v2_client.infer_url(server.url, model.name)
                closed = loadgen.run(loadgen.LoadSpec(
                    url, bodies, concurrency=config.concurrency, duration_s=config.duration_s,
                    check=check, label=model.name), progress)
                rate = max(1.0, config.open_fraction * closed.summary().rps)
                poisson = loadgen.run(loadgen.LoadSpec(
                    url, bodies, rate=rate, connections=config.connections,
                    duration_s=config.duration_s / 2, check=check, label=model.name), progress)
                runs += [(model.name, closed), (model.name, poisson)]
        # leaving the block stopped the server, and its shutdown flushed the ledger
    phases = _price(ledger_url, runs)
    return DemoResult(models, phases, workdir, time.perf_counter() - t0)


def label_check(truth: np.ndarray) -> Callable[[int, bytes], bool]:
    """Is the served label of test image i its true class?"""
    labels = truth.tolist()

    def check(i: int, response: bytes) -> bool:
        return v2_client.output_data(response, "label")[0] == labels[i]

    return check


def _price(ledger_url: str, runs: list[tuple[str, loadgen.LoadResult]]) -> list[Phase]:
    engine = open_engine(ledger_url)
    card = RateCard.load()  # the server's card: ServerSettings got no override
    try:
        phases = []
        for name, run in runs:
            # usage rows are stamped at arrival and batches at compute start: both fall in the
            # run's window, and runs do not overlap
            until = run.started_at + run.elapsed_s + 1e-3
            totals = model_usage(engine, run.started_at, until, name).get(name, ModelUsage(name))
            price = (card.device(totals.device).usd_per_hour(totals.pricing or "on_demand")
                     if totals.device else None)
            phases.append(Phase(name, run.summary(), totals, run.elapsed_s, price))
        return phases
    finally:
        engine.dispose()
