"""The optimizer end to end: its plan served and replayed through HTTP, against the naive
deployment of the reference variant, on the real test splits.

For each workload: train the reference models into a repository (`frugalserve workloads
build`), run `frugalserve optimize` on the reference (variants, profiles, calibrated cascades,
plan.yaml), then serve two repositories one after the other with the same server and replay
the whole test split through each, one row per request, 64 connections:

- naive: the reference variant alone, without batching (max_batch_size 1) and without a plan;
- plan: the repository as optimize left it (plan.yaml, default tier).

Cost is what the server metered (the responses' cost_pico_usd, checked against the ledger);
accuracy is what came back through HTTP. Targets (issue 4): at most 0.5 points below the naive
accuracy, and at least 10x cheaper on Fashion-MNIST, 3x on sentiment.

One command: `.venv/bin/python bench/optimizer.py [--workloads fashion,sentiment]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import date
from decimal import Decimal
from pathlib import Path

import numpy as np
import report
import yaml
from rich.console import Console

from frugalserve.economics.ledger import batches, open_engine, sqlite_url
from frugalserve.economics.meter import format_usd
from frugalserve.progress import new_progress
from frugalserve.replay import (
    Replay,
    labelled_data,
    naive_repository,
    request_bodies,
    serve_and_replay,
)

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "optimizer"
BENCHMARKS = HERE.parent / "BENCHMARKS.md"
FRUGALSERVE = [sys.executable, "-m", "frugalserve.cli"]
CONNECTIONS = 64  # a busy server, as the plan search assumes
MAX_DROP_POINTS = 0.5


@dataclass(frozen=True)
class Workload:
    name: str
    build: str  # `workloads build --only`
    model: str  # the reference the optimizer starts from
    data: str  # `optimize --data`
    input_name: str  # the models' one input
    candidates: str  # other repository models with the same signature
    target: float  # at least this many times cheaper than naive
    p99_ms: float
    build_options: tuple[str, ...] = ()  # more `workloads build` options


WORKLOADS = {
    "fashion": Workload("fashion", "fashion-mnist,fashion-cnn", "fmnist-cnn", "fashion-mnist",
                        "X", "fmnist-mlp,fmnist-logreg", 10.0, 50.0,
                        # one epoch leaves the CNN no better than the MLP: nothing to cascade to
                        ("--cnn-epochs", "3")),
    "sentiment": Workload("sentiment", "sentiment", "sentiment-minilm-l6", "sentiment", "text",
                          "sentiment-minilm-l3,sentiment-tfidf", 3.0, 100.0),
}


def cli(*args: str) -> None:
    subprocess.run([*FRUGALSERVE, *args], check=True)


def rows_per_batch(ledger_url: str) -> dict[str, float]:
    """Mean rows per executed batch, by variant, as the ledger recorded them."""
    from sqlalchemy import func, select

    engine = open_engine(ledger_url)
    try:
        with engine.connect() as conn:
            return {v: round(float(rows), 1) for v, rows in conn.execute(
                select(batches.c.variant, func.avg(batches.c.size)).group_by(batches.c.variant))}
    finally:
        engine.dispose()


def run_workload(workload: Workload, console: Console, rebuild: bool) -> dict:
    work = OUT / workload.name
    repository = work / "repository"
    if rebuild or not (repository / workload.model).exists():
        cli("workloads", "build", "--repository", str(repository), "--only", workload.build,
            "--ledger", sqlite_url(work / "training.db"), "--workdir", str(OUT / "embeddings"),
            *workload.build_options)
    cli("optimize", workload.model, "--repository", str(repository), "--data", workload.data,
        "--max-accuracy-drop", str(MAX_DROP_POINTS), "--p99-ms", str(workload.p99_ms),
        "--candidates", workload.candidates, "--ledger", sqlite_url(work / "training.db"))
    plan = yaml.safe_load((repository / workload.model / "plan.yaml").read_text())
    data = labelled_data(workload.data)  # the splits `optimize --data` read
    y = data.y_test
    bodies = request_bodies(workload.input_name, data.x_test)
    naive_repo = naive_repository(repository, workload.model, work / "naive" / "repository")
    runs = {}
    with new_progress(console) as progress:
        for key, repo in (("naive", naive_repo), ("plan", repository)):
            ledger = work / f"{key}.db"
            ledger.unlink(missing_ok=True)
            runs[key] = serve_and_replay(repo, workload.model, bodies, y, sqlite_url(ledger),
                                         label=f"{workload.name}-{key}",
                                         concurrency=CONNECTIONS, progress=progress)
    (naive, naive_ledger), (planned, plan_ledger) = runs["naive"], runs["plan"]
    for r, ledger in ((naive, naive_ledger), (planned, plan_ledger)):
        if r.cost_pusd != ledger:
            raise RuntimeError(f"{r.label}: responses say {r.cost_pusd} pico-dollars, the "
                               f"ledger {ledger}")
        if r.ok != r.requests:
            raise RuntimeError(f"{r.label}: {r.requests - r.ok} failed requests")
    factor = naive.usd_per_million / planned.usd_per_million
    drop = 100 * (naive.accuracy - planned.accuracy)
    estimate = plan["estimate"]
    tier = plan.get("default_tier", "standard")
    return {"workload": workload.name, "model": workload.model, "test_rows": len(y),
            "naive": asdict(naive), "plan": asdict(planned), "factor": factor,
            "accuracy_drop_points": drop, "target": workload.target,
            "standard_tier": plan["tiers"][tier],
            "estimated_factor": (estimate["counterfactual"]["cost_per_1m_usd"]
                                 / estimate["tiers"][tier]["cost_per_1m_usd"]),
            "estimated_rows_per_batch": estimate["tiers"][tier]["rows_per_batch"],
            "rows_per_batch": rows_per_batch(sqlite_url(work / "plan.db")),
            "passed": factor >= workload.target and drop <= MAX_DROP_POINTS}


HEADER = ["workload", "deployment", "test accuracy", "$ / 1M", "p50 ms", "p99 ms", "req/s",
          "variant paths", "cheaper", "result"]


def rows(results: list[dict]) -> list[list[str]]:
    out = []
    for r in results:
        for key in ("naive", "plan"):
            d = Replay(**r[key])
            last = key == "plan"
            out.append([r["workload"], key, f"{d.accuracy:.4f}",
                        format_usd(Decimal(d.usd_per_million)),
                        f"{d.p50_ms:.2f}", f"{d.p99_ms:.2f}", f"{d.rps:,.0f}", d.answered_by(),
                        f"{r['factor']:.1f}x (target {r['target']:g}x)" if last else "",
                        ("PASS" if r["passed"] else "FAIL") if last else ""])
    return out


def chart(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = [r["workload"] for r in results]
    xs = np.arange(len(names))
    for offset, key, color in ((-0.2, "naive", "#b0b0b0"), (0.2, "plan", "#2a9d8f")):
        vals = [Replay(**r[key]).usd_per_million for r in results]
        bars = ax.bar(xs + offset, vals, 0.4, label=key, color=color)
        for bar, r in zip(bars, results, strict=True):
            ax.annotate(f"acc {r[key]['accuracy']:.3f}", (bar.get_x() + bar.get_width() / 2,
                        bar.get_height()), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(xs, names)
    ax.set_yscale("log")
    ax.set_ylabel("metered $ per 1M predictions")
    ax.set_title("reference without batching vs the optimizer's plan (test split over HTTP)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="fashion,sentiment")
    parser.add_argument("--rebuild", action="store_true", help="train the models again")
    args = parser.parse_args()
    unknown = set(args.workloads.split(",")) - set(WORKLOADS)
    if unknown:
        parser.error(f"--workloads: unknown {', '.join(sorted(unknown))}; choose from "
                     f"{', '.join(WORKLOADS)}")
    console = Console()
    OUT.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    results = [run_workload(WORKLOADS[w], console, args.rebuild)
               for w in args.workloads.split(",")]
    console.print(report.rich_table("optimizer, end to end through HTTP", HEADER, rows(results)))
    png = OUT / "optimizer.png"
    chart(results, png)
    (OUT / "results.json").write_text(json.dumps(results, indent=2))
    today = date.today().isoformat()
    section = "\n".join([
        f"## Optimizer end to end, {today}", "",
        f"- Command: `.venv/bin/python bench/optimizer.py --workloads {args.workloads}` "
        f"({time.perf_counter() - t0:.0f} s). Test split replayed through HTTP, one row per "
        f"request, {CONNECTIONS} connections; cost as metered by the server (responses = "
        "ledger); naive = the reference variant without batching.",
        "- Server: `frugalserve serve` in a process of its own on core 0, the load generator on "
        "the other core. A batch is billed its worker thread's CPU time (onnxruntime, one "
        "thread).",
        "- Chart: `bench/out/optimizer/optimizer.png`", "",
        report.markdown_table(HEADER, rows(results)), "",
        *[f"- {r['workload']}: standard tier `{json.dumps(r['standard_tier'])}`; the optimizer "
          f"estimated {r['estimated_factor']:.1f}x with batches of "
          f"{r['estimated_rows_per_batch']} rows per stage, the server ran "
          f"{json.dumps(r['rows_per_batch'])}" for r in results],
    ])
    report.update_benchmarks_md(BENCHMARKS, today, section, name="optimizer-bench")
    console.print(f"chart: {png}; BENCHMARKS.md updated")
    return 0 if all(r["passed"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
