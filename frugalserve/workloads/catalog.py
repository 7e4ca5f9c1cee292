"""Every seed workload trained into one model repository, each training run in the ledger:
what `frugalserve workloads build` runs.

| workload | models written | metric |
|---|---|---|
| fashion-mnist | fmnist-logreg, fmnist-mlp | accuracy |
| fashion-cnn | fmnist-cnn | accuracy |
| sentiment | sentiment-tfidf, sentiment-minilm-l3, sentiment-minilm-l6 | accuracy |
| movielens | movielens-mf (exact), its variant ivf | recall@10 |

Each model's training cost is the one its recorded run was priced at (none without a ledger);
a variant row has none of its own: its training is its model's.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from rich.progress import Progress
from rich.table import Table

WORKLOADS = ("fashion-mnist", "fashion-cnn", "sentiment", "movielens")


@dataclass(frozen=True)
class BuiltModel:
    name: str  # the model in the repository (a variant as "<model>/<variant>")
    metric: str
    validation: float
    test: float  # of the exported artifact where the workload measures it so
    train_s: float
    cost_usd: Decimal | None = None  # of the recorded training run
    note: str = ""


def parse_only(text: str | None) -> tuple[str, ...]:
    """'fashion-mnist,movielens' -> the workloads in WORKLOADS order; None -> all of them."""
    if text is None:
        return WORKLOADS
    chosen = {part.strip() for part in text.split(",") if part.strip()}
    unknown = sorted(chosen - set(WORKLOADS))
    if unknown or not chosen:
        raise ValueError(f"unknown workload(s) {', '.join(unknown) or '(none given)'}; "
                         f"choose from {', '.join(WORKLOADS)}")
    return tuple(w for w in WORKLOADS if w in chosen)


def build_workloads(repository: Path, only: tuple[str, ...], progress: Progress,
                    ledger_url: str | None = None, cnn_epochs: int = 1,
                    workdir: Path | None = None) -> list[BuiltModel]:
    """Train the chosen workloads into `repository`, in order, one bar each besides the
    workloads' own; returns one row per model written."""
    builders: dict[str, Callable[[], list[BuiltModel]]] = {
        "fashion-mnist": lambda: _fashion_mnist(repository, progress, ledger_url),
        "fashion-cnn": lambda: _fashion_cnn(repository, progress, ledger_url, cnn_epochs),
        "sentiment": lambda: _sentiment(repository, progress, ledger_url, workdir),
        "movielens": lambda: _movielens(repository, progress, ledger_url),
    }
    overall = progress.add_task("workloads", total=len(only))
    rows: list[BuiltModel] = []
    for name in only:
        progress.update(overall, description=f"workloads ({name})")
        rows.extend(builders[name]())
        progress.update(overall, advance=1)
    progress.update(overall, description="workloads")
    return rows


def _fashion_mnist(repository: Path, progress: Progress,
                   ledger_url: str | None) -> list[BuiltModel]:
    from . import fashion_mnist

    data = fashion_mnist.load()
    return [BuiltModel(m.name, "accuracy", m.validation_accuracy, m.test_accuracy, m.train_s,
                       m.training_cost_usd)
            for m in fashion_mnist.build_repository(repository, data, progress, ledger_url)]


def _fashion_cnn(repository: Path, progress: Progress, ledger_url: str | None,
                 epochs: int) -> list[BuiltModel]:
    from . import fashion_cnn, fashion_mnist

    built = fashion_cnn.build(repository, fashion_mnist.load(), progress, epochs=epochs,
                              ledger_url=ledger_url)
    return [BuiltModel(fashion_cnn.NAME, "accuracy", built.validation_accuracy,
                       built.test_accuracy, built.train_s, built.training_cost_usd,
                       note=f"{epochs} epoch(s), {built.steps} steps")]


def _sentiment(repository: Path, progress: Progress, ledger_url: str | None,
               workdir: Path | None) -> list[BuiltModel]:
    from . import sentiment

    results = sentiment.build(sentiment.load(), progress, workdir, repository,
                              ledger_url=ledger_url)
    return [BuiltModel(r.name, "accuracy", r.validation_accuracy, r.test_accuracy, r.train_s,
                       r.training_cost_usd) for r in results]


def _movielens(repository: Path, progress: Progress,
               ledger_url: str | None) -> list[BuiltModel]:
    from . import movielens

    r = movielens.build(movielens.load(), progress, repository=repository,
                        ledger_url=ledger_url)
    assert r.exported is not None
    name = movielens.MODEL_NAME
    return [
        BuiltModel(name, "recall@10", r.validation_recall, r.exported.test_recall, r.train_s,
                   r.training_cost_usd, note="exact top-10"),
        BuiltModel(f"{name}/{movielens.IVF_VARIANT}", "recall@10", r.ivf_validation_recall,
                   r.exported.ivf_test_recall, r.train_s,
                   note=f"IVF: {r.ivf_recall_vs_exact:.0%} of exact's top-10; its cost "
                        f"is {name}'s"),
    ]


def built_table(rows: list[BuiltModel], repository: Path) -> Table:
    table = Table(title=f"workloads built into {repository}")
    for column, justify in (("model", "left"), ("metric", "left"), ("validation", "right"),
                            ("test", "right"), ("train s", "right"),
                            ("training cost", "right"), ("", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for r in rows:
        cost = "—" if r.cost_usd is None else f"${r.cost_usd:.6f}"
        table.add_row(r.name, r.metric, f"{r.validation:.4f}", f"{r.test:.4f}",
                      f"{r.train_s:.1f}", cost, r.note)
    return table
