"""Training runs in the ledger: measured here, imported from elsewhere, or estimated from 6ND.

A run's cost is device-hours x the rate card's $/h x the share held, in integer pico-dollars
(Decimal arithmetic: a large run is millions of dollars, and floats would drift). Energy is an
estimate everywhere: the device's rated watts for the time it was held; no power meter is read.
Every model version links its runs by (model, version): `training_runs_for` and
`training_totals` give them and their sum.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import sys
import time
from dataclasses import asdict, dataclass, field
from decimal import ROUND_HALF_EVEN, Decimal, localcontext
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import Engine, select

from .ledger import PICO_MAX, open_engine, sqlite_url, training_runs
from .meter import PICO_PER_USD, pico_to_usd
from .ratecard import DevicePrice, RateCard

log = logging.getLogger("frugalserve.training")

LEDGER_FILE = "frugalserve-ledger.db"  # the name `frugalserve serve` gives its SQLite ledger
LEDGER_ENV = "FRUGALSERVE_LEDGER"
SOURCES = ("measured", "imported", "estimated")


# -- the FLOPs estimator -------------------------------------------------------------------------

def training_flops(params: float, tokens: float) -> float:
    """About 6 FLOPs per parameter per token: 2 for the forward pass, 4 for the backward
    (Kaplan et al. 2020, "Scaling Laws for Neural Language Models", section 2.1)."""
    return 6.0 * params * tokens


def implied_mfu(params: float, tokens: float, gpu_hours: float, peak_flops: float) -> float:
    """Model FLOPs utilization that a reported run implies: 6ND over what its devices could do."""
    return training_flops(params, tokens) / (gpu_hours * 3600 * peak_flops)


# Llama 2 70B: 2.0T tokens in 1,720,320 A100-80GB GPU-hours (Touvron et al. 2023, "Llama 2:
# Open Foundation and Fine-Tuned Chat Models", Table 2) at 312 TFLOP/s dense BF16 per A100:
# MFU = 6 x 70e9 x 2e12 / (1,720,320 x 3600 x 312e12) = 0.435. The default for estimates: a
# published, well-tuned large run on the hardware most estimates are for; small or badly
# parallelised jobs reach less, so pass your own --mfu when you know it.
LLAMA2_70B_GPU_HOURS = 1_720_320
DEFAULT_MFU = implied_mfu(70e9, 2e12, LLAMA2_70B_GPU_HOURS, 312e12)


# -- money and energy ----------------------------------------------------------------------------

def cost_pusd(usd_per_hour: Decimal, device_seconds: float, share: float = 1.0) -> int:
    """Pico-dollars for `device_seconds` of a device at `usd_per_hour`, `share` of it held."""
    if not math.isfinite(device_seconds):  # e.g. --params 1e300 --tokens 1e300
        raise ValueError(f"{device_seconds} device-seconds is out of range")
    with localcontext() as ctx:
        ctx.prec = 60  # exact for any run: 1e9 device-hours at $100/h is 27 digits
        exact = (Decimal(repr(device_seconds)) * usd_per_hour * Decimal(repr(share))
                 * PICO_PER_USD / 3600)
        pico = int(exact.to_integral_value(ROUND_HALF_EVEN))
    if pico > PICO_MAX:  # e.g. --gpu-hours 1e300: PostgreSQL refused it at insert
        raise ValueError(f"{device_seconds:.3g} device-seconds at ${usd_per_hour}/h cost more "
                         f"than the ledger holds (${PICO_MAX // PICO_PER_USD:.3g})")
    return pico


def energy_kwh(watts: float, device_seconds: float, share: float = 1.0) -> float:
    """An estimate, not a measurement: the rate card's watts (board power for GPUs, ~3.5 W per
    vCPU for CPU instances) drawn for the whole time, times the share held. Facility overhead
    (PUE) is not in it; the on-prem price counts that."""
    return watts * share * device_seconds / 3.6e6


# -- a run and its totals ------------------------------------------------------------------------

@dataclass(frozen=True)
class TrainingRun:
    """One row of `training_runs`."""

    model: str
    version: str
    device: str
    pricing: str
    started_at: float  # epoch seconds
    wall_s: float
    energy_kwh: float
    cost_pusd: int
    source: str  # measured | imported | estimated
    devices: int = 1
    share: float = 1.0
    cpu_s: float | None = None
    gpu_s: float | None = None  # GPU-seconds held (wall x GPUs used), not busy time
    peak_rss_bytes: int | None = None
    status: str = "ok"  # ok | failed
    params: dict[str, Any] = field(default_factory=dict)
    notes: str | None = None
    id: int | None = None

    @property
    def cost_usd(self) -> Decimal:
        return pico_to_usd(self.cost_pusd)

    @property
    def device_hours(self) -> float:
        return self.wall_s * self.devices * self.share / 3600


@dataclass(frozen=True)
class TrainingTotals:
    """What a set of runs (say, one model version's) took and cost, failed runs included."""

    runs: int = 0
    failed: int = 0
    device_hours: float = 0.0
    energy_kwh: float = 0.0
    cost_pusd: int = 0
    cost_pusd_by_source: dict[str, int] = field(default_factory=dict)

    def cost_usd(self) -> Decimal:
        return pico_to_usd(self.cost_pusd)


def training_totals(runs: list[TrainingRun]) -> TrainingTotals:
    by_source: dict[str, int] = {}
    for run in runs:
        by_source[run.source] = by_source.get(run.source, 0) + run.cost_pusd
    return TrainingTotals(
        runs=len(runs),
        failed=sum(run.status != "ok" for run in runs),
        device_hours=sum(run.device_hours for run in runs),
        energy_kwh=sum(run.energy_kwh for run in runs),
        cost_pusd=sum(run.cost_pusd for run in runs),
        cost_pusd_by_source=by_source,
    )


# -- the ledger ----------------------------------------------------------------------------------

def default_ledger_url() -> str:
    """$FRUGALSERVE_LEDGER, else the SQLite file `frugalserve serve` makes beside a repository
    in the working directory."""
    return os.environ.get(LEDGER_ENV) or sqlite_url(Path.cwd() / LEDGER_FILE)


def open_ledger(url: str | None = None) -> Engine:
    return open_engine(url or default_ledger_url())


_COLUMNS = [c.name for c in training_runs.columns if c.name != "id"]


def record_run(engine: Engine, run: TrainingRun) -> int:
    """Insert one run; its new id."""
    values = {name: getattr(run, name) for name in _COLUMNS}
    with engine.begin() as conn:
        result = conn.execute(training_runs.insert().values(**values))
        return int(result.inserted_primary_key[0])


def training_runs_for(engine: Engine, model: str | None = None,
                      version: str | None = None) -> list[TrainingRun]:
    """The runs of a model version (or of every version of a model, or all), oldest first."""
    query = select(training_runs).order_by(training_runs.c.started_at, training_runs.c.id)
    if model is not None:
        query = query.where(training_runs.c.model == model)
    if version is not None:
        query = query.where(training_runs.c.version == version)
    with engine.connect() as conn:
        rows = conn.execute(query).mappings().all()
    return [TrainingRun(**{**row, "params": row["params"] or {}}) for row in rows]


# -- runs done elsewhere, and estimates ----------------------------------------------------------

MAX_HOURS = 1e6  # 114 years of wall-clock time


MAX_DEVICES = 2**31 - 1  # what the ledger's INTEGER column holds


def _check_allocation(devices: int, share: float) -> None:
    if not 1 <= devices <= MAX_DEVICES:  # --gpus 1e20 raised OverflowError at insert
        raise ValueError(f"devices must be in [1, {MAX_DEVICES}], got {devices}")
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")


def imported_run(card: RateCard, *, model: str, version: str, device: str, hours: float,
                 devices: int = 1, pricing: str = "on_demand", share: float = 1.0,
                 started_at: float | None = None, notes: str | None = None) -> TrainingRun:
    """A run done elsewhere: `hours` of wall-clock time on `devices` of `device`, by default
    ending now."""
    if not 0 < hours <= MAX_HOURS:  # a start before year 1 would break every listing
        raise ValueError(f"hours must be in (0, {MAX_HOURS:g}], got {hours}")
    _check_allocation(devices, share)
    now = time.time()
    if started_at is not None and started_at > now:  # --started 9999-12-31 broke the report
        raise ValueError("the run's start is in the future; give when it started")
    price = card.device(device)
    wall_s = hours * 3600
    return TrainingRun(
        model=model, version=version, device=device, pricing=pricing,
        started_at=now - wall_s if started_at is None else started_at,
        wall_s=wall_s, devices=devices, share=share,
        gpu_s=wall_s * devices * share if price.kind == "gpu" else None,
        energy_kwh=energy_kwh(price.watts, wall_s * devices, share),
        cost_pusd=cost_pusd(price.usd_per_hour(pricing), wall_s * devices, share),
        source="imported", notes=notes,
    )


@dataclass(frozen=True)
class TrainingEstimate:
    device: str
    pricing: str
    devices: int  # in parallel: wall-clock time is device_hours / devices
    params: float | None
    tokens: float | None
    flops: float | None  # 6ND
    peak_flops: float | None  # per device
    mfu: float | None  # given, defaulted, or implied by given GPU-hours
    mfu_is_default: bool
    device_hours: float
    usd_per_hour: Decimal
    cost_pusd: int
    energy_kwh: float
    gpu: bool

    @property
    def wall_hours(self) -> float:
        return self.device_hours / self.devices

    @property
    def cost_usd(self) -> Decimal:
        return pico_to_usd(self.cost_pusd)

    def as_run(self, model: str, version: str, started_at: float | None = None,
               notes: str | None = None) -> TrainingRun:
        wall_s = self.wall_hours * 3600
        params = {"n_params": self.params, "tokens": self.tokens, "flops": self.flops,
                  "peak_flops": self.peak_flops, "mfu": self.mfu,
                  "device_hours": self.device_hours}
        return TrainingRun(
            model=model, version=version, device=self.device, pricing=self.pricing,
            started_at=time.time() if started_at is None else started_at,
            wall_s=wall_s, devices=self.devices,
            gpu_s=self.device_hours * 3600 if self.gpu else None,
            energy_kwh=self.energy_kwh, cost_pusd=self.cost_pusd, source="estimated",
            params={k: v for k, v in params.items() if v is not None}, notes=notes,
        )


def _peak_flops(price: DevicePrice) -> float:
    if price.peak_flops is None:
        raise ValueError(f"device '{price.key}' has no peak_flops on the rate card; give the "
                         "GPU-hours instead, or add peak_flops to the device in your rate card")
    return price.peak_flops


def estimate_training(card: RateCard, device: str, *, params: float | None = None,
                      tokens: float | None = None, mfu: float | None = None,
                      gpu_hours: float | None = None, devices: int = 1,
                      pricing: str = "on_demand") -> TrainingEstimate:
    """Device-hours from 6ND / (peak FLOP/s x MFU), or as given; cost = device-hours x $/h."""
    _check_allocation(devices, 1.0)
    if mfu is not None and gpu_hours is not None:
        raise ValueError("give an MFU or the GPU-hours, not both: the GPU-hours imply the MFU")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"MFU must be in (0, 1], got {mfu}")
    for name, value in (("params", params), ("tokens", tokens), ("gpu_hours", gpu_hours)):
        if value is not None and not value > 0:
            raise ValueError(f"{name} must be greater than zero, got {value}")
    price = card.device(device)
    flops = training_flops(params, tokens) if params and tokens else None
    peak = price.peak_flops
    defaulted = gpu_hours is None and mfu is None
    if gpu_hours is None:
        if flops is None:
            raise ValueError("give the parameters and tokens (N and D), or the GPU-hours")
        peak = _peak_flops(price)
        used_mfu = DEFAULT_MFU if mfu is None else mfu
        gpu_hours = flops / (peak * used_mfu) / 3600
    else:
        used_mfu = (implied_mfu(params, tokens, gpu_hours, peak)
                    if flops is not None and peak is not None else None)
    return TrainingEstimate(
        device=device, pricing=pricing, devices=devices, params=params, tokens=tokens,
        flops=flops, peak_flops=peak, mfu=used_mfu,
        mfu_is_default=defaulted,
        device_hours=gpu_hours, usd_per_hour=price.usd_per_hour(pricing),
        cost_pusd=cost_pusd(price.usd_per_hour(pricing), gpu_hours * 3600),
        energy_kwh=energy_kwh(price.watts, gpu_hours * 3600), gpu=price.kind == "gpu",
    )


# -- measuring a run here ------------------------------------------------------------------------

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _cpu_seconds() -> float:
    # user + system of this process and of children it has waited for (subprocess, multiprocessing
    # pools that were joined); long-lived workers never reaped (joblib's loky) are not counted
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _reset_peak_rss() -> bool:
    """Linux 4.0+: restart the RSS high-water mark (VmHWM) from the current RSS, so the peak read
    at the end is the run's own rather than the process's since it started. This also lowers
    what ru_maxrss reports afterwards, which nothing in frugalserve relies on."""
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _peak_rss_bytes(reset: bool) -> int:
    if reset:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the process's lifetime peak
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def _torch_cuda() -> Any | None:
    """torch.cuda when this process has imported torch and CUDA works, else None. torch is
    never imported here: a run that did not import it used no GPU through it, and importing it
    costs seconds."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        return torch.cuda if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - a broken CUDA install means no GPU to measure
        return None


def _gpu_start() -> None:
    cuda = _torch_cuda()
    if cuda is not None and cuda.is_initialized():
        for i in range(cuda.device_count()):
            cuda.reset_peak_memory_stats(i)


def _gpu_stop() -> tuple[int | None, int]:
    """(GPUs the run used or None without CUDA, their peak allocated bytes); waits for queued
    kernels, so that the wall time taken after it includes them."""
    cuda = _torch_cuda()
    if cuda is None:
        return None, 0
    if not cuda.is_initialized():
        return 0, 0
    peaks = []
    for i in range(cuda.device_count()):
        cuda.synchronize(i)
        peaks.append(cuda.max_memory_allocated(i))
    used = [p for p in peaks if p > 0]
    return len(used), max(used, default=0)


@dataclass(frozen=True)
class _Measured:
    started_at: float
    wall_s: float
    cpu_s: float
    gpus_used: int | None
    peak_rss_bytes: int
    gpu_peak_bytes: int


class _Probe:
    """Clocks and high-water marks around a block of code."""

    def __init__(self) -> None:
        self.started_at = time.time()
        self._rss_reset = _reset_peak_rss()
        _gpu_start()
        self._cpu0 = _cpu_seconds()
        self._t0 = time.perf_counter()

    def stop(self) -> _Measured:
        gpus_used, gpu_peak = _gpu_stop()
        wall_s = time.perf_counter() - self._t0
        cpu_s = _cpu_seconds() - self._cpu0
        return _Measured(self.started_at, wall_s, cpu_s, gpus_used,
                         _peak_rss_bytes(self._rss_reset), gpu_peak)


class TrainingTracker:
    """`with track_training(...) as run:` measures the block and records it on the way out.

    The device and price are looked up and the ledger opened on entry, so a typo or an
    unreachable database fails before the training rather than after it. A block that raises
    is recorded too, status 'failed' (its time was paid for), and the exception goes on. Add to
    `run.params` (N, D, accuracy...) inside the block; after it, `run.record` is the row and
    `run.id` its id.
    """

    def __init__(self, model: str, version: str, device: str, *, ledger_url: str | None = None,
                 share: float = 1.0, pricing: str = "on_demand", devices: int = 1,
                 rate_card: RateCard | Path | None = None, params: dict[str, Any] | None = None,
                 notes: str | None = None) -> None:
        _check_allocation(devices, share)
        card = rate_card if isinstance(rate_card, RateCard) else RateCard.load(rate_card)
        self.price = card.device(device)
        self.usd_per_hour = self.price.usd_per_hour(pricing)
        self.model, self.version, self.device, self.pricing = model, version, device, pricing
        self.share, self.devices = share, devices
        self.ledger_url = ledger_url
        self.params: dict[str, Any] = dict(params or {})
        self.notes = notes
        self.record: TrainingRun | None = None
        self.id: int | None = None
        self._engine: Engine | None = None
        self._probe: _Probe | None = None

    def __enter__(self) -> TrainingTracker:
        self._engine = open_ledger(self.ledger_url)
        self._probe = _Probe()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        assert self._probe is not None and self._engine is not None
        measured = self._probe.stop()
        self.record = self._run(measured, exc)
        try:
            self.id = record_run(self._engine, self.record)
        except Exception as write_error:  # noqa: BLE001 - keep the row, never fail the training
            path = _spill(self.record)
            log.error("could not write the training run to the ledger (%s); it is saved in %s",
                      write_error, path)
        finally:
            self._engine.dispose()
        return False

    def _run(self, measured: _Measured, exc: BaseException | None) -> TrainingRun:
        params = dict(self.params)
        if measured.gpus_used:
            params.setdefault("gpu_peak_bytes", measured.gpu_peak_bytes)
        notes = self.notes
        if exc is not None:
            failure = f"failed: {type(exc).__name__}: {exc}"
            notes = f"{notes}; {failure}" if notes else failure
        device_s = measured.wall_s * self.devices
        return TrainingRun(
            model=self.model, version=self.version, device=self.device, pricing=self.pricing,
            started_at=measured.started_at,
            wall_s=measured.wall_s, devices=self.devices, share=self.share,
            cpu_s=measured.cpu_s,
            gpu_s=None if measured.gpus_used is None else measured.wall_s * measured.gpus_used,
            peak_rss_bytes=measured.peak_rss_bytes,
            energy_kwh=energy_kwh(self.price.watts, device_s, self.share),
            cost_pusd=cost_pusd(self.usd_per_hour, device_s, self.share),
            source="measured", status="ok" if exc is None else "failed",
            params=params, notes=notes,
        )


def track_training(model: str, version: str, device: str, *, ledger_url: str | None = None,
                   share: float = 1.0, pricing: str = "on_demand", devices: int = 1,
                   rate_card: RateCard | Path | None = None,
                   params: dict[str, Any] | None = None,
                   notes: str | None = None) -> TrainingTracker:
    """Measure a training block and record what it cost (see `TrainingTracker`):

        with frugalserve.track_training(model="fmnist-mlp", version="1",
                                        device="aws-c7i.large") as run:
            clf.fit(X, y)
        print(run.record.cost_usd)
    """
    return TrainingTracker(model, version, device, ledger_url=ledger_url, share=share,
                           pricing=pricing, devices=devices, rate_card=rate_card,
                           params=params, notes=notes)


def _spill(run: TrainingRun) -> Path:
    path = Path.cwd() / f"training-run-spill-{int(time.time())}.jsonl"
    doc = asdict(run) | {"cost_pusd": str(run.cost_pusd)}  # JSON readers stop at 2**53
    with path.open("a") as out:
        out.write(json.dumps(doc, default=str) + "\n")
    return path
