"""Results of one benchmark run: the targets, one table (Rich and Markdown), a chart, JSON, and
the dated section in BENCHMARKS.md."""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt  # headless: matplotlib falls back to Agg
import orjson
from loadgen import WrkResult
from rich import box
from rich.table import Table
from servers import BARE, FRUGAL, FRUGAL_BINARY, NAIVE

SUBJECT = FRUGAL.key  # the server the ratios and targets are about (metering on, JSON)
SUBJECT_BINARY = FRUGAL_BINARY.key  # the same server, sent V2 binary-extension requests
ENGINE_BATCHES = (1, 32)  # engine rows shown besides the best batch size


@dataclass
class Run:
    workload: str
    server: str  # Server.key
    label: str
    connections: int
    result: WrkResult | None = None
    cpu_share: float | None = None  # server CPU seconds / wall seconds during the run
    others_share: float | None = None  # share of the server's core other processes used
    mean_batch: float | None = None  # rows per model call, where the server reports it
    engine_share: float | None = None  # model compute seconds / wall seconds, likewise
    error: str | None = None

    @property
    def failed(self) -> int:
        return self.result.non_2xx + self.result.socket_errors if self.result else 0


@dataclass
class Results:
    date: str
    command: str
    machine: dict[str, Any]
    settings: dict[str, Any]
    engines: dict[str, dict[int, float]] = field(default_factory=dict)  # samples/s per batch
    runs: list[Run] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def rps(self, workload: str, server: str, connections: int) -> float | None:
        result = self.result(workload, server, connections)
        return result.rps if result else None

    def result(self, workload: str, server: str, connections: int) -> WrkResult | None:
        for run in self.runs:
            if (run.workload, run.server, run.connections) == (workload, server, connections):
                return run.result
        return None

    def engine_best(self, workload: str) -> tuple[int, float] | None:
        profile = self.engines.get(workload)
        return max(profile.items(), key=lambda item: item[1]) if profile else None

    def workloads(self) -> list[str]:
        return list(dict.fromkeys(run.workload for run in self.runs))


# ---- targets -------------------------------------------------------------------------------

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge, "<": operator.lt, "<=": operator.le}


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None  # None: not measured (a server failed), which fails the target
    op: str
    threshold: float
    unit: str  # "x", "ms", "%" or "" (a count)

    @property
    def passed(self) -> bool:
        return self.value is not None and _OPS[self.op](self.value, self.threshold)

    def show(self, value: float | None) -> str:
        if value is None:
            return "n/a"
        if self.unit == "x":
            return f"{value:.2f}x"
        return f"{value:.3g} {self.unit}".strip() if self.unit else f"{value:.0f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _latency(result: WrkResult | None, percentile: int) -> float | None:
    return None if result is None else result.p50_ms if percentile == 50 else result.p99_ms


def _engine_target(results: Results, large: str) -> Target:
    """frugalserve at 64 conns over the engine's best batch size, with the better of its JSON
    and binary rows (the name says which; where binary wins, the JSON ratio follows it)."""
    best = results.engine_best(large)
    engine = best[1] if best else None
    json_ratio = _ratio(results.rps(large, SUBJECT, 64), engine)
    binary_ratio = _ratio(results.rps(large, SUBJECT_BINARY, 64), engine)
    candidates = [(r, label) for r, label in ((json_ratio, FRUGAL.label),
                                              (binary_ratio, FRUGAL_BINARY.label))
                  if r is not None]
    value, label = max(candidates) if candidates else (None, FRUGAL.label)
    name = f"{large}, 64 conns: {label} / onnxruntime best" + (f" b={best[0]}" if best else "")
    if label != FRUGAL.label:
        name += f" (JSON: {_fmt(json_ratio, suffix='x')})"
    return Target(name, value, ">=", 0.80, "x")


def targets(results: Results, small: str, large: str) -> list[Target]:
    """The serving targets: `small` is the HTTP-bound model, `large` the compute-bound one.
    The metering target is bench/metering.py's: its servers run side by side, where runs one
    after another, as here, differ by more than metering costs."""
    on = results.rps(small, SUBJECT, 64)
    failed = sum(run.failed for run in results.runs if run.server.startswith(SUBJECT))
    return [
        Target(f"{small}, 64 conns: {SUBJECT} / naive FastAPI req/s",
               _ratio(on, results.rps(small, NAIVE.key, 64)), ">=", 3.0, "x"),
        Target(f"{small}, 64 conns: {SUBJECT} p99",
               _latency(results.result(small, SUBJECT, 64), 99), "<", 10.0, "ms"),
        Target(f"{small}, 64 conns: {SUBJECT} / bare-ASGI ceiling req/s",
               _ratio(on, results.rps(small, BARE.key, 64)), ">=", 0.40, "x"),
        Target(f"{small}, 1 conn: {SUBJECT} p50",
               _latency(results.result(small, SUBJECT, 1), 50), "<", 0.5, "ms"),
        _engine_target(results, large),
        Target(f"{SUBJECT}, all rows (metering on/off, JSON/binary): failed requests",
               float(failed), "<=", 0, ""),
    ]


def ceiling_note(results: Results, large: str, share: float = 0.80) -> str | None:
    """Says so when no server of the bare-ASGI kind can reach `share` of the raw engine: on one
    core a server pays the bare app's per-request cost (HTTP + JSON parse) and the engine's
    per-sample cost one after the other, so it serves at most 1 / (1/bare + 1/best) req/s,
    which is bare / (bare + best) of the engine's best."""
    best, bare = results.engine_best(large), results.rps(large, BARE.key, 64)
    if best is None or bare is None:
        return None
    bound = bare / (bare + best[1])
    if bound >= share:
        return None
    return (f"{large}: the bare-ASGI app (parses the request, skips the model) serves "
            f"{bare:,.0f} req/s and onnxruntime's best is {best[1]:,.0f} samples/s (batch "
            f"{best[0]}); on one core a server paying both costs reaches at most "
            f"{bound:.2f}x of the engine, below the {share:.0%} target: with JSON requests, "
            "per-request HTTP + JSON is too large a share of this model's per-sample cost for "
            "any HTTP server of that kind (the binary row skips most of the parse).")


# ---- the table -----------------------------------------------------------------------------

LEGEND = (
    "req/s for the servers, samples/s for the engine rows (onnxruntime in-process at batch "
    "size b); failed: non-2xx responses + socket errors; CPU: the server's CPU time over the "
    "run's wall time (a server saturated at 64 conns is near 100%, unless other processes "
    "took the core); others: the share of core 0 that other processes on this machine used "
    "during the run (above a few % the row is tainted); batch: mean rows per model call "
    "(from frugalserve's /metrics; the engine's batch size); fs ratio: "
    f"{SUBJECT}'s (metering on, JSON requests) req/s at the same connection count divided by "
    f"the row's, and for the engine rows, {SUBJECT} at 64 connections divided by the engine's "
    f"samples/s (JSON requests, then binary ones where measured); {SUBJECT} binary: the same "
    "server sent the same request in V2's binary tensor extension (a JSON header, then the "
    "raw float32 bytes; Inference-Header-Content-Length), as Triton's Python client "
    "sends it by default. No request, JSON or binary, names `outputs`, so every server "
    "returns all outputs (label and probabilities), in JSON."
)
HEADER = ["server", "conns", "req/s", "p50 ms", "p99 ms", "failed", "CPU", "others", "batch",
          "fs ratio"]


def _fmt(value: float | None, digits: int = 2, suffix: str = "") -> str:
    return "-" if value is None else f"{value:,.{digits}f}{suffix}"


def _percent(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.0f}%"


def _run_row(results: Results, run: Run) -> list[str]:
    r = run.result
    if r is None:
        return [run.label, str(run.connections), "error", *["-"] * (len(HEADER) - 3)]
    ours = results.rps(run.workload, SUBJECT, run.connections)
    mine = run.server in (SUBJECT, SUBJECT_BINARY)
    ratio = "-" if mine else _fmt(_ratio(ours, r.rps), suffix="x")
    return [run.label, str(run.connections), _fmt(r.rps, 0), _fmt(r.p50_ms),
            _fmt(r.p99_ms), str(run.failed), _percent(run.cpu_share),
            _percent(run.others_share), _fmt(run.mean_batch, 1), ratio]


def _engine_rows(results: Results, workload: str) -> list[list[str]]:
    profile, best = results.engines.get(workload), results.engine_best(workload)
    if not profile or not best:
        return []
    ours = results.rps(workload, SUBJECT, 64)
    binary = results.rps(workload, SUBJECT_BINARY, 64)
    shown = [(f"onnxruntime b={n}", profile[n]) for n in ENGINE_BATCHES]
    shown.append((f"onnxruntime best b={best[0]}", best[1]))

    def ratio(rate: float) -> str:
        text = _fmt(_ratio(ours, rate), 3, "x")
        return text if binary is None else f"{text}; binary {_fmt(_ratio(binary, rate), 3, 'x')}"

    return [[label, "-", _fmt(rate, 0), "-", "-", "-", "-", "-", label.rsplit("=", 1)[1],
             ratio(rate)] for label, rate in shown]


def table_rows(results: Results, workload: str) -> list[list[str]]:
    runs = [_run_row(results, run) for run in results.runs if run.workload == workload]
    return runs + _engine_rows(results, workload)


def target_rows(items: list[Target]) -> list[list[str]]:
    return [[t.name, t.show(t.value), f"{t.op} {t.show(t.threshold)}",
             "PASS" if t.passed else "FAIL"] for t in items]


TARGET_HEADER = ["target", "measured", "required", "result"]


def rich_table(title: str, header: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for i, name in enumerate(header):
        table.add_column(name, justify="right" if i else "left", no_wrap=not i)
    for row in rows:
        style = {"PASS": "green", "FAIL": "bold red"}.get(row[-1])
        table.add_row(*row, style=style)
    return table


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if i else "---" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


# ---- files ---------------------------------------------------------------------------------

def write_json(results: Results, items: list[Target], path: Path) -> None:
    data = asdict(results) | {"targets": [asdict(t) | {"passed": t.passed} for t in items]}
    data["engines"] = {w: {str(n): v for n, v in p.items()} for w, p in results.engines.items()}
    path.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2))


def _colors(results: Results) -> dict[str, str]:
    """One colour per server, the same in every panel."""
    labels = dict.fromkeys(run.label for run in results.runs)
    return {label: f"C{i}" for i, label in enumerate(labels)}


def _grouped_bars(ax: Any, results: Results, workload: str, value: Callable[[WrkResult], float],
                  ylabel: str) -> None:
    runs = [run for run in results.runs if run.workload == workload and run.result]
    servers, colors = list(dict.fromkeys(run.label for run in runs)), _colors(results)
    conns = sorted({run.connections for run in runs})
    width = 0.8 / max(1, len(servers))
    for i, label in enumerate(servers):
        points = [(conns.index(run.connections) + i * width, value(run.result))
                  for run in runs if run.label == label and run.result]
        ax.bar([x for x, _ in points], [y for _, y in points], width, label=label,
               color=colors[label])
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(conns))], [f"{c} conns" for c in conns])
    ax.set_ylabel(ylabel)
    ax.set_title(f"{workload}: {ylabel}")


def _engine_panel(ax: Any, results: Results, workload: str) -> None:
    colors = _colors(results)
    bars = [(run.label, run.result.rps, colors[run.label]) for run in results.runs
            if run.workload == workload and run.connections == 64 and run.result]
    best = results.engine_best(workload)
    profile = results.engines.get(workload, {})
    bars += [(f"onnxruntime batch {n}", profile[n], "0.6") for n in ENGINE_BATCHES
             if n in profile]
    if best:
        bars.append((f"onnxruntime best (batch {best[0]})", best[1], "0.35"))
    ax.barh([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    ax.invert_yaxis()
    ax.set_xlabel("requests/s (servers, 64 conns) or samples/s (engine)")
    ax.set_title(f"{workload}: servers vs raw engine")


def write_chart(results: Results, small: str, large: str, path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.5), constrained_layout=True)
    _grouped_bars(axes[0], results, small, lambda r: r.rps, "requests/s")
    _grouped_bars(axes[1], results, small, lambda r: r.p99_ms, "p99 latency (ms)")
    axes[1].set_yscale("log")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=8)
    _engine_panel(axes[2], results, large)
    fig.suptitle(f"Serving benchmark {results.date}: {results.machine.get('cpu', '')}, "
                 "servers on core 0, wrk on core 1")
    fig.savefig(path, dpi=110)
    plt.close(fig)


def markdown_section(results: Results, items: list[Target]) -> str:
    m, s = results.machine, results.settings
    notes = "".join(f"- Note: {note}\n" for note in results.notes)
    return f"""## Serving benchmark, {results.date}

- Command: `{results.command}` (`make bench` runs it with no options)
- Machine: nproc {m['nproc']}, {m['cpu']}, Linux {m['kernel']}, Python {m['python']}, \
{m['wrk']}
- frugalserve {m['frugalserve']}; onnxruntime {s['onnxruntime']}; MLServer {s['mlserver']}
- Load: wrk -t1 -cN -d{s['duration_s']:g}s --latency on core 1 (taskset), one single-sample \
V2 JSON request per call (and, in the `frugalserve binary` row, the same request in V2's binary \
tensor extension); each server alone on core 0 (taskset), warmed up for \
{s['warmup_s']:g}s first; engine: onnxruntime in-process on core 0, one thread.
- Models: {'; '.join(f'`{name}`: {text}' for name, text in s['models'].items())}.
- Columns: {LEGEND}
{notes}
### Targets

{markdown_table(TARGET_HEADER, target_rows(items))}
{"".join(_markdown_results(results, w) for w in results.workloads())}"""


def _markdown_results(results: Results, workload: str) -> str:
    table = markdown_table(HEADER, table_rows(results, workload))
    return f"\n### {workload}: {results.settings['models'].get(workload, '')}\n\n{table}\n"


def update_benchmarks_md(path: Path, date: str, section: str, name: str = "serving-bench") -> None:
    """Append the `name` section for `date`, or replace the one already there for that date."""
    start, end = f"<!-- {name} {date} -->", f"<!-- /{name} {date} -->"
    block = f"{start}\n{section.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end) + r"\n?", re.DOTALL)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)
