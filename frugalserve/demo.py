"""`frugalserve demo`: train two Fashion-MNIST classifiers, serve them, load them, price them;
then optimize the better one and show what the plan saves, through the server.

The optimizer story: `optimize` makes the MLP's variants (int8, pruned, a distilled student) and
takes the logistic regression as a candidate, calibrates cascades and writes the cheapest plan
within half a point of accuracy; the test set is then replayed through HTTP twice, against the
naive deployment (the MLP alone, batches of one) and against the plan, and both are priced by
the server's own meter. The student's training cost is set against what it saves per
prediction: its break-even.

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
from .economics.ledger import open_engine, sqlite_url
from .economics.ratecard import RateCard
from .economics.summary import ModelUsage, model_usage
from .optimize.optimizer import Settings, optimize_model
from .optimize.plan_search import Lever, Targets
from .progress import new_progress
from .replay import Replay, fashion_dataset, naive_repository, request_bodies, serve_and_replay
from .repository.plan import REFERENCE
from .server_process import ServerProcess
from .workloads import fashion_mnist
from .workloads.onnx_export import INPUT_NAME

LEDGER_FILE = "ledger.db"


class NoPlan(RuntimeError):
    """The optimizer found no plan within the demo's targets (on an unusually slow machine)."""


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path = Path("runs/demo")
    duration_s: float = 10.0  # closed loop per model; the open loop runs half as long
    concurrency: int = 32
    open_fraction: float = 0.4  # open-loop rate as a share of the closed-loop throughput
    connections: int = 64  # open loop: connection pool

    def __post_init__(self) -> None:
        # checked before minutes of training, not by the first load run after them
        if not 0 < self.duration_s < float("inf"):
            raise ValueError(f"the duration must be positive and finite, got {self.duration_s:g} s")
        if self.concurrency < 1:
            raise ValueError(f"the concurrency must be >= 1, got {self.concurrency}")


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
class Savings:
    """The optimizer's plan against the naive deployment, both replayed through the server."""

    model: str
    naive: Replay
    plan: Replay
    chosen: str  # the standard tier's plan, e.g. "fmnist-logreg → int8-static (64 / 1 ms)"
    levers: list[Lever]
    estimated_factor: float  # what the search expected from the profiles
    student_training_usd: float | None
    student_saving_per_1m_usd: float | None  # student vs reference, both at the chosen batch
    student_in_plan: bool = False  # whether the chosen plan serves the student at all

    @property
    def factor(self) -> float:
        return self.naive.usd_per_million / max(self.plan.usd_per_million, 1e-18)

    @property
    def student_break_even(self) -> float | None:
        """Predictions the student must serve before its training has paid for itself."""
        if not self.student_training_usd or not self.student_saving_per_1m_usd:
            return None
        if self.student_saving_per_1m_usd <= 0:
            return None
        return self.student_training_usd / self.student_saving_per_1m_usd * 1e6


@dataclass(frozen=True)
class DemoResult:
    models: list[fashion_mnist.ReferenceModel]
    phases: list[Phase]
    workdir: Path
    elapsed_s: float
    savings: Savings | None = None


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
        bodies = request_bodies(INPUT_NAME, data.test.x)
        check = label_check(data.test.y)
        task = progress.add_task("start server", total=1)
        with ServerProcess(repository, ledger_url) as server:
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
        savings = optimize_and_verify(repository, data, bodies, ledger_url, workdir, progress)
    phases = _price(ledger_url, runs)
    return DemoResult(models, phases, workdir, time.perf_counter() - t0, savings)


OPTIMIZED = "fmnist-mlp"
STUDENT = "student"  # the distilled variant's name
VERIFY_CONNECTIONS = 64  # a busy server: the plan's batches fill as the search assumed


def optimize_and_verify(repository: Path, data: fashion_mnist.FashionMNIST,
                        bodies: list[bytes], ledger_url: str, workdir: Path,
                        progress) -> Savings:
    """`frugalserve optimize fmnist-mlp --candidates fmnist-logreg --max-accuracy-drop 0.5
    --p99-ms 50`, then the test set through the naive deployment and through the plan."""
    dataset = fashion_dataset(data)
    settings = Settings(Targets(max_accuracy_drop=0.005, p99_ms=50.0),
                        candidates=("fmnist-logreg",), ledger_url=ledger_url)
    result = optimize_model(repository, OPTIMIZED, dataset, settings, progress)
    search = result.search
    if search.chosen is None:
        raise NoPlan(f"no plan for {OPTIMIZED} met the targets; see {result.chart_path}")
    naive_repo = naive_repository(repository, OPTIMIZED, workdir / "naive" / "repository")
    naive, _ = serve_and_replay(naive_repo, OPTIMIZED, bodies, data.test.y,
                                sqlite_url(workdir / "naive" / LEDGER_FILE),
                                label="naive: fmnist-mlp, batch 1",
                                concurrency=VERIFY_CONNECTIONS, progress=progress)
    plan, _ = serve_and_replay(repository, OPTIMIZED, bodies, data.test.y, ledger_url,
                               label="plan: standard tier", concurrency=VERIFY_CONNECTIONS,
                               progress=progress)
    profiles = {p.variant: p for p in result.variants.profiles}
    student = profiles.get(STUDENT)
    training = (float(student.notes["training_cost_usd"])
                if student is not None and "training_cost_usd" in student.notes else None)
    saving = None
    batch = search.chosen.batching.max_batch_size
    if student is not None and batch in student.latency:
        reference = profiles[REFERENCE].latency[batch].mean_ms
        saving = (search.price.usd_per_1m(reference, batch)
                  - search.price.usd_per_1m(student.latency[batch].mean_ms, batch))
    estimated = search.counterfactual.cost_per_1m_usd / search.chosen.cost_per_1m_usd
    return Savings(OPTIMIZED, naive, plan,
                   f"{search.chosen.label()} ({search.chosen.batching.label()})",
                   list(search.levers), estimated, training, saving,
                   STUDENT in search.chosen.stages)


def label_check(truth: np.ndarray) -> Callable[[int, bytes], bool]:
    """Is the served label of test image i its true class?"""
    labels = truth.tolist()

    def check(i: int, response: bytes) -> bool:
        return v2_client.output_data(response, "label")[0] == labels[i]

    return check


def _price(ledger_url: str, runs: list[tuple[str, loadgen.LoadResult]]) -> list[Phase]:
    engine = open_engine(ledger_url)
    card = RateCard.load()  # the server's card: ServerProcess passes no override
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
