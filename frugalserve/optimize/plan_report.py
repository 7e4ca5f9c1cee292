"""How a plan search is shown: the Pareto frontier, the tiers (validation next to test) and the
levers as Rich tables, and cost against accuracy as a PNG chart."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from rich import box
from rich.table import Table

from ..economics.meter import format_usd as usd
from .plan_search import PlanOption, SearchResult

MAX_ROWS = 40  # frontier rows in the table; the chart shows all of them


def _thresholds(p: PlanOption) -> str:
    return ", ".join(f"{t:.4f}" for t in p.thresholds) or "-"


def _escalated(p: PlanOption) -> str:
    return ", ".join(f"{r:.1%}" for r in p.reach[1:]) or "-"


def _tier_names(result: SearchResult) -> dict[tuple, str]:
    names: dict[tuple, list[str]] = {}
    for tier, option in result.tiers.items():
        names.setdefault(option.key(), []).append(tier)
    return {k: ", ".join(v) for k, v in names.items()}


def frontier_table(result: SearchResult) -> Table:
    """The Pareto frontier, cheapest first; ★ marks the chosen plan."""
    naive = result.counterfactual.cost_per_1m_usd
    table = Table(title=f"Pareto frontier: {len(result.frontier)} of {len(result.plans)} plans "
                        f"(validation; drop bound = paired drop + {result.targets.margin_z:g} SE, "
                        f"pp; ★ chosen)", box=box.SIMPLE_HEAD)
    for col in ("", "plan", "thresholds", "batch / delay", "accuracy", "Δ pp", "drop bound",
                "$ per 1M", "vs naive", "p99 ms", "escalated", "tier"):
        table.add_column(col, justify="left" if col in ("", "plan", "tier") else "right")
    chosen = None if result.chosen is None else result.chosen.key()
    tiers = _tier_names(result)
    for p in result.frontier[:MAX_ROWS]:
        factor = f"{naive / p.cost_per_1m_usd:,.1f}x" if p.cost_per_1m_usd > 0 else "-"
        table.add_row("★" if p.key() == chosen else "", p.label(), _thresholds(p),
                      p.batching.label(), f"{p.accuracy:.4f}",
                      f"{(p.accuracy - result.reference_accuracy) * 100:+.2f}",
                      f"{p.drop_bound * 100:.2f}", usd(p.cost_per_1m_usd), factor,
                      f"{p.p99_ms:.3f}", _escalated(p), tiers.get(p.key(), ""))
    if len(result.frontier) > MAX_ROWS:
        table.caption = f"{len(result.frontier) - MAX_ROWS} more frontier plans in the chart"
    return table


def tiers_table(result: SearchResult,
                tests: Mapping[str, tuple[float, tuple[float, ...]]] | None = None) -> Table:
    """Each tier's plan: the validation estimate beside the test-set result."""
    table = Table(title="tiers: validation estimate vs test set", box=box.SIMPLE_HEAD)
    for col in ("tier", "plan", "batch / delay", "val acc", "test acc", "val escalated",
                "test escalated", "$ per 1M", "p99 ms"):
        table.add_column(col, justify="left" if col in ("tier", "plan") else "right")
    rows = [("naive", result.counterfactual)] + list(result.tiers.items())
    for tier, p in rows:
        test = (tests or {}).get(tier)
        test_escalated = "-" if test is None else (
            ", ".join(f"{r:.1%}" for r in test[1][1:]) or "-")
        table.add_row("naive (no batching)" if tier == "naive" else tier, p.label(),
                      p.batching.label(), f"{p.accuracy:.4f}",
                      "-" if test is None else f"{test[0]:.4f}", _escalated(p), test_escalated,
                      usd(p.cost_per_1m_usd), f"{p.p99_ms:.3f}")
    return table


def levers_table(result: SearchResult) -> Table:
    naive, chosen = result.counterfactual, result.chosen
    title = "levers of the saving"
    if chosen is not None:
        title += (f": {usd(naive.cost_per_1m_usd)} → {usd(chosen.cost_per_1m_usd)} per 1M "
                  f"({result.saving_factor:,.1f}x cheaper)")
    table = Table(title=title, box=box.SIMPLE_HEAD)
    for col in ("lever", "step", "saved per 1M", "share"):
        table.add_column(col, justify="left" if col in ("lever", "step") else "right")
    for lever in result.levers:
        table.add_row(lever.name, lever.detail, usd(lever.usd_per_1m), f"{lever.share:.1%}")
    return table


def write_chart(result: SearchResult, path: Path, title: str = "") -> Path:
    """Cost per 1M predictions (log) against validation accuracy: every plan, the frontier,
    the accuracy floor, the naive deployment and the chosen plan."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, and safe off the main thread
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 6))
    for cascade, marker, label in ((False, "o", "single variant"), (True, "^", "cascade")):
        pts = [p for p in result.plans if p.is_cascade == cascade]
        ax.scatter([p.cost_per_1m_usd for p in pts], [p.accuracy for p in pts], s=10,
                   marker=marker, color="0.75", label=f"{label} ({len(pts)} plans)", zorder=1)
    front = sorted(result.frontier, key=lambda p: p.cost_per_1m_usd)
    fast = [p for p in front if p.p99_ms <= result.targets.p99_ms]
    ax.scatter([p.cost_per_1m_usd for p in front], [p.accuracy for p in front], s=22,
               color="tab:blue", label="Pareto frontier (accuracy, cost, p99)", zorder=2)
    envelope, best = [], -1.0
    for p in fast:  # the cost-accuracy staircase among plans meeting the p99 target
        if p.accuracy > best:
            envelope.append(p)
            best = p.accuracy
    if envelope:
        ax.step([p.cost_per_1m_usd for p in envelope], [p.accuracy for p in envelope],
                where="post", color="tab:blue", lw=1.2,
                label=f"frontier within p99 ≤ {result.targets.p99_ms:g} ms")
    floor = result.reference_accuracy - result.targets.max_accuracy_drop
    ax.axhline(floor, color="tab:red", ls="--", lw=1,
               label=f"accuracy floor (reference − {result.targets.max_accuracy_drop * 100:g} pp)")
    naive = result.counterfactual
    ax.scatter([naive.cost_per_1m_usd], [naive.accuracy], marker="X", s=90, color="black",
               label="naive: reference, batch 1", zorder=3)
    if result.chosen is not None:
        c = result.chosen
        ax.scatter([c.cost_per_1m_usd], [c.accuracy], marker="*", s=260, color="tab:red",
                   label=f"chosen: {c.label()} @ {c.batching.label()}", zorder=4)
    for tier, p in result.tiers.items():
        ax.annotate(tier, (p.cost_per_1m_usd, p.accuracy), textcoords="offset points",
                    xytext=(6, -12 if tier == "standard" else 6), fontsize=8)
    ax.set_xscale("log")
    ax.set_xlabel("cost per 1M predictions (USD, log scale)")
    ax.set_ylabel("validation accuracy")
    lo = min(floor, min(p.accuracy for p in front)) if front else floor
    ax.set_ylim(max(0.0, lo - 0.02), min(1.0, result.reference_accuracy + 0.015))
    ax.set_title(title or "serving plans: cost vs accuracy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
