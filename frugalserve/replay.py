"""Replay a labelled test set through a running server and read what it cost.

Every test row is one request, sent once, by a closed loop of connections; each response is
checked against its label, and its metered cost (`cost_pico_usd`) and variant path are read off
the response. This is how a plan is verified end to end: accuracy seen through HTTP, cost as
the server metered it.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import orjson
import yaml
from rich.progress import Progress

from . import loadgen, v2_client
from .economics.meter import PICO_PER_USD
from .repository.plan import PLAN_FILE, VARIANTS_DIR
from .repository.repository import CONFIG_FILE

if TYPE_CHECKING:
    from .optimize.optimizer import Dataset
    from .workloads.fashion_mnist import FashionMNIST

DATA_SETS = ("fashion-mnist", "sentiment")  # what `optimize --data` and bench/optimizer.py name


@dataclass(frozen=True)
class Replay:
    label: str
    requests: int
    ok: int
    accuracy: float  # of the answered requests, against the labels
    cost_pusd: int  # sum of the responses' metered costs
    p50_ms: float
    p99_ms: float
    rps: float
    variants: dict[str, int] = field(default_factory=dict)  # variant path -> requests

    @property
    def usd_per_million(self) -> float:
        return self.cost_pusd / max(self.ok, 1) * 1e6 / PICO_PER_USD

    def answered_by(self) -> str:
        """The variant paths that answered, most used first: 'a 77%, a>b 23%'."""
        return ", ".join(f"{path} {n / max(self.ok, 1):.0%}" for path, n in
                         sorted(self.variants.items(), key=lambda kv: -kv[1]))


def labelled_data(name: str) -> Dataset:
    """The train (unlabelled), validation and test splits of a seed workload as model inputs:
    Fashion-MNIST pixels, or Rotten Tomatoes texts as object arrays [n, 1]. Raises the
    workload's DatasetMissing when its data package is not installed, ValueError for a name
    not in DATA_SETS."""
    from .optimize.optimizer import Dataset
    from .workloads import fashion_mnist, sentiment

    if name == "fashion-mnist":
        return fashion_dataset(fashion_mnist.load())
    if name == "sentiment":
        s = sentiment.load()

        def rows(split: sentiment.TextSplit) -> np.ndarray:
            return np.asarray(split.text, dtype=object).reshape(-1, 1)

        return Dataset(name, rows(s.train), rows(s.validation), s.validation.y, rows(s.test),
                       s.test.y)
    raise ValueError(f"no data set {name!r}; there are {', '.join(DATA_SETS)}")


def fashion_dataset(data: FashionMNIST) -> Dataset:
    from .optimize.optimizer import Dataset

    return Dataset("fashion-mnist", data.train.x, data.validation.x, data.validation.y,
                   data.test.x, data.test.y)


def request_bodies(input_name: str, x: np.ndarray) -> list[bytes]:
    """One single-row request per test row, asking for the label only."""
    return [v2_client.infer_body({input_name: x[i:i + 1]}, ["label"]) for i in range(len(x))]


def replay(url: str, bodies: Sequence[bytes], labels: np.ndarray, *, concurrency: int = 16,
           label: str = "replay", progress: Progress | None = None) -> Replay:
    """Send every body once (body i has label labels[i]) to the infer URL `url`."""
    truth = np.asarray(labels).reshape(-1).tolist()
    costs: list[int] = []
    paths: Counter[str] = Counter()

    def check(i: int, body: bytes) -> bool:
        doc = orjson.loads(body)
        params = doc["parameters"]
        costs.append(int(params["cost_pico_usd"]))
        paths[params.get("variant", "reference")] += 1
        served = next(o["data"] for o in doc["outputs"] if o["name"] == "label")
        return served[0] == truth[i]

    run = loadgen.run(loadgen.LoadSpec(url, bodies, concurrency=concurrency, duration_s=None,
                                       requests=len(bodies), check=check, label=label),
                      progress)
    summary = run.summary()
    return Replay(label, summary.requests, summary.ok, summary.accuracy or 0.0, sum(costs),
                  summary.p50_ms, summary.p99_ms, summary.rps, dict(paths))


def naive_repository(repository: Path, model: str, into: Path) -> Path:
    """A repository holding `model` as naively deployed: its reference variant alone, no plan,
    batches of one. The counterfactual every saving is measured against."""
    if into.exists():
        shutil.rmtree(into)
    shutil.copytree(repository / model, into / model,
                    ignore=lambda _d, names: [n for n in names
                                              if n in (VARIANTS_DIR, PLAN_FILE, "plan.png")])
    config_path = into / model / CONFIG_FILE
    # an absent or empty config.yaml is a valid one (every setting defaulted)
    config = (yaml.safe_load(config_path.read_text()) if config_path.exists() else None) or {}
    config["batching"] = {**config.get("batching", {}), "max_batch_size": 1,
                          "max_queue_delay_ms": 0}
    config_path.write_text(yaml.safe_dump(config))
    return into


def serve_and_replay(repository: Path, model: str, bodies: Sequence[bytes], labels: np.ndarray,
                     ledger_url: str, *, label: str, concurrency: int = 16,
                     progress: Progress | None = None) -> tuple[Replay, int]:
    """Start a server on `repository` (a process of its own), replay, stop it (the ledger
    flushes); also the ledger's total for the model's requests answered since the start, to
    check the responses against (pico-dollars)."""
    from sqlalchemy import func, select

    from .economics.ledger import open_engine, usage
    from .server_process import ServerProcess

    since = time.time()
    with ServerProcess(repository, ledger_url) as server:
        result = replay(v2_client.infer_url(server.url, model), bodies, labels,
                        concurrency=concurrency, label=label, progress=progress)
    engine = open_engine(ledger_url)
    try:
        with engine.connect() as conn:
            metered = conn.execute(select(func.sum(usage.c.cost_pusd))
                                   .where(usage.c.model == model, usage.c.status == 200,
                                          usage.c.ts >= since)).scalar()
    finally:
        engine.dispose()
    return result, int(metered or 0)
