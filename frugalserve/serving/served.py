"""One model version being served: its signature check, its batchers (one per variant its plan
uses), cascades across them, and the meter."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from functools import partial

import numpy as np

from ..economics.ledger import LedgerWriter, UsageChunk
from ..economics.meter import Meter, split_cost, split_evenly
from ..repository import LoadedVersion, ModelConfig
from ..repository.plan import REFERENCE, Stage
from ..tensors import TensorSpec, datatype_of
from .admission import settle
from .batcher import Batch, Batcher, Pending
from .errors import BadInput, InferenceError, ModelFailed
from .metrics import VersionStats
from .types import InferenceRequest, InferenceResponse

_sum = np.add.reduce  # ndarray.sum() adds a Python-level wrapper on the hot path


def _fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return all(d == -1 or d == n for d, n in zip(declared[1:], shape[1:], strict=True))


@dataclass(slots=True)
class Flow:
    """One request travelling a cascade. Its usage record is written once, when every row has
    an answer or has failed, so it carries the cost of every stage any of its rows passed."""

    request: InferenceRequest
    future: asyncio.Future
    arrival: float
    rows: int
    route: tuple[tuple[Batcher, str, float | None], ...]  # (batcher, variant, threshold)
    open_rows: int
    cost: int = 0
    compute_s: float = 0.0
    depth: int = 0  # the deepest stage reached
    outputs: dict[str, np.ndarray] | None = None  # assembled when its rows part ways
    status: int = 200


@dataclass(slots=True)
class Part:
    """Some rows of a Flow waiting at one stage; index: their rows in the request (None: all)."""

    flow: Flow
    depth: int
    index: np.ndarray | None


class ServedVersion:
    """A version and its variants: one batcher per variant its plan uses (a plan-less version
    has one, "reference"); each tier is a route through them."""

    def __init__(self, model: str, loaded: LoadedVersion, config: ModelConfig, meter: Meter | None,
                 stats: VersionStats, ledger: LedgerWriter | None):
        self.model = model
        self.version = loaded.version
        self.loaded = loaded
        self.inputs: tuple[TensorSpec, ...] = loaded.inputs
        self.outputs: tuple[TensorSpec, ...] = loaded.outputs
        self._input_names = tuple(s.name for s in self.inputs)
        # per input: name, dtype, rank, fixed trailing dims (None when some are -1), spec
        self._checks = tuple(
            (s.name, s.dtype, len(s.shape), None if -1 in s.shape[1:] else s.shape[1:], s)
            for s in self.inputs)
        self._output_names = frozenset(s.name for s in self.outputs)
        # a config that declares some of the artifact's outputs serves only those (as its
        # metadata says); None: it declares them all, nothing to filter
        produced = {s.name for s in loaded.runtime.signature()[1]}
        self._declared = (None if produced <= self._output_names
                          else [s.name for s in self.outputs])
        self.meter = meter
        self.stats = stats
        self.ledger = ledger if meter is not None else None
        plan = self.plan = loaded.plan
        b = plan.batching if plan is not None and plan.batching is not None else config.batching
        self.max_batch_size = b.max_batch_size
        self.max_queue_delay_s = b.max_queue_delay_ms / 1000
        self.confidence_output = plan.confidence_output if plan is not None else None
        self.batchers: dict[str, Batcher] = {}
        self._log_keys: dict[str, int] = {}  # by variant: its code in the ledger's batch log
        for variant in (plan.variants if plan is not None else [REFERENCE]):
            if self.ledger is not None:
                self._log_keys[variant] = self.ledger.log.key(
                    model, loaded.version, variant, config.device.type, config.device.pricing,
                    config.device.share)
            name = f"{model}/{loaded.version}" + ("" if variant == REFERENCE else f"/{variant}")
            runtime = loaded.runtime_of(variant)
            self.batchers[variant] = Batcher(
                runtime.predict, partial(self._finish, variant),
                self._dropped, max_batch_size=b.max_batch_size,
                max_queue_delay_s=self.max_queue_delay_s, max_queue_size=b.max_queue_size,
                instances=b.instances, name=name, thread_cpu=runtime.single_threaded)
        self.routes = {tier: tuple((self.batchers[s.variant], s.variant, s.threshold)
                                   for s in stages)
                       for tier, stages in (plan.tiers.items() if plan is not None
                                            else [(None, [_REF_STAGE])])}
        self.default_tier = plan.default_tier if plan is not None else None
        self.downgrade = plan.budget_downgrade if plan is not None else None

    # -- lifecycle ---------------------------------------------------------------------------

    def warm_up(self) -> None:
        for batcher in self.batchers.values():
            batcher.warm_up(self.example_inputs)

    def start(self) -> None:
        for batcher in self.batchers.values():
            batcher.start()

    async def drain(self) -> None:
        """Earlier stages first: their escalations must still find the later stages open."""
        depth = {v: max(i for route in self.routes.values()
                        for i, (_b, rv, _t) in enumerate(route) if rv == v)
                 for v in self.batchers}
        for variant in sorted(self.batchers, key=depth.__getitem__):
            await self.batchers[variant].drain()

    @property
    def queued(self) -> int:
        return sum(b.queued for b in self.batchers.values())

    def exec_estimate(self, rows: int) -> float:
        """Seconds of compute a request of `rows` may cost: its dearest route, every stage."""
        return max(sum(b.profile.estimate(rows) for b, _v, _t in route)
                   for route in self.routes.values())

    # -- admission ---------------------------------------------------------------------------

    def check(self, request: InferenceRequest) -> int:
        """Validate inputs and requested outputs against the signature; return the batch rows."""
        inputs = request.inputs
        if len(inputs) != len(self._checks):
            raise self._names_error(inputs)
        rows = -1
        for name, dtype, ndim, tail, spec in self._checks:
            arr = inputs.get(name)
            if arr is None:
                raise self._names_error(inputs)
            if arr.dtype != dtype:
                raise BadInput(f"input '{name}': datatype {datatype_of(arr)} does not match "
                               f"the model's {spec.datatype}")
            shape = arr.shape
            if len(shape) != ndim or (shape[1:] != tail if tail is not None
                                      else not _fits(shape, spec.shape)):
                raise BadInput(f"input '{name}': shape {list(shape)} does not match the "
                               f"model's {list(spec.shape)}")
            if rows == -1:
                rows = shape[0]
            elif shape[0] != rows:
                raise BadInput("inputs disagree on the batch size (first dimension)")
            # one reduction propagates any NaN; only then pay for the exact test (inf - inf)
            if not spec.allow_nan and dtype.kind == "f":
                total = _sum(arr, None)
                if total != total and np.isnan(arr).any():
                    raise BadInput(f"input '{name}' contains NaN, which this model does not "
                                   "allow")
        if rows < 1:
            raise BadInput("the batch is empty (first dimension is 0)")
        if rows > self.max_batch_size:
            raise BadInput(f"batch of {rows} rows exceeds the model's max_batch_size "
                           f"{self.max_batch_size}")
        if request.outputs is not None:
            unknown = [n for n in request.outputs if n not in self._output_names]
            if unknown:
                raise BadInput(f"unknown output(s) {unknown}; the model has "
                               f"{sorted(self._output_names)}")
        return rows

    def _names_error(self, inputs: dict) -> BadInput:
        return BadInput(f"model '{self.model}' takes inputs {list(self._input_names)}, "
                        f"got {sorted(inputs)}")

    def submit(self, request: InferenceRequest, rows: int, arrival: float, future) -> None:
        route = self.routes.get(request.tier) or self.routes[self.default_tier]
        expires = None if request.timeout_s is None else arrival + request.timeout_s
        deadline = arrival + self.max_queue_delay_s
        if len(route) == 1:  # plain serving: the request itself rides
            route[0][0].submit(Pending(request.inputs, rows, arrival, deadline, expires, future,
                                       request))
            return
        flow = Flow(request, future, arrival, rows, route, rows)
        route[0][0].submit(Pending(request.inputs, rows, arrival, deadline, expires, future,
                                   Part(flow, 0, None)))

    # -- metering and completion (event loop thread) -----------------------------------------

    def _finish(self, variant: str, batch: Batch) -> None:
        items = batch.items
        stats = self.stats
        compute_s = batch.compute_s
        stats.batches += 1
        stats.busy_s += compute_s
        stats.batch_size.observe(batch.rows)
        stats.compute.observe(compute_s)
        ledger = self.ledger
        if ledger is not None:
            cost = self.meter.cost(compute_s)
            # every item holds at least one row: as many rows as items means one row each
            shares = (split_evenly(cost, len(items)) if batch.rows == len(items)
                      else split_cost(cost, [item.rows for item in items]))
            batch_id = ledger.reserve_ids()
        else:
            batch_id = cost = None
            shares = [0] * len(items)
        outputs, error = batch.outputs, batch.error
        sliced = len(items) > 1
        dispatched = batch.dispatched
        now = time.perf_counter()
        wall = time.time()
        offset = 0
        confidence = None  # per row of the batch, computed for the first cascade part
        closed: dict[str, list[tuple]] | None = None  # usage records of finished flows, by path
        parts = False  # some items are cascade parts: the plain requests are a subset
        odd: dict[int, int] | None = None  # plain items whose status is not 200, by position
        for item, share in zip(items, shares, strict=True):
            request = item.context
            if type(request) is Part:
                parts = True
                if confidence is None and error is None and request.flow.route[
                        request.depth][2] is not None:
                    confidence = outputs[self.confidence_output].max(axis=1)
                done = self._advance(request, item, share, batch, offset, confidence, now)
                if done is not None:
                    closed = closed or {}
                    closed.setdefault(done[0], []).append(
                        self._close(done[1], now, wall, batch.rows))
                offset += item.rows
                continue
            future = item.future
            if error is not None or future.done():
                # failed, or the caller went away (the work was still done and paid)
                status = 500 if error is not None else 499
                if not future.done():
                    future.set_exception(self._failed(error))
                stats.errors[status] += 1
                odd = odd or {}
                odd[items.index(item)] = status
            else:
                queue_s = dispatched - item.arrival
                if sliced:
                    end = offset + item.rows
                    outs = {k: v[offset:end] for k, v in outputs.items()}
                else:
                    outs = outputs
                wanted = request.outputs if request.outputs is not None else self._declared
                if wanted is not None:
                    outs = {k: outs[k] for k in wanted}
                future.set_result(InferenceResponse(
                    self.model, self.version, outs, request.id, request.parameters, share,
                    queue_s, compute_s, batch.rows, variant))
                stats.ok += 1
                stats.queue.observe(queue_s)
                stats.total.observe(now - item.arrival)
            offset += item.rows
            if request.budget is not None:  # its reservation out, its share in
                settle(request.budget, request.reserved, share)
        if ledger is None:
            return
        plain = items
        if parts or odd:
            keep = [k for k, it in enumerate(items) if type(it.context) is not Part]
            plain = [items[k] for k in keep]
            shares = [shares[k] for k in keep]
            statuses = [odd.get(k, 200) for k in keep] if odd else None
        else:
            statuses = None
        self._meter(ledger, variant, batch, batch_id, cost, plain, shares, statuses, now, wall)
        if closed:
            for path, chunk in closed.items():
                ledger.add_usage(UsageChunk(ledger.reserve_ids(), chunk[0][2], self.model,
                                            self.version, path, batch_id, batch.rows,
                                            compute_s * 1000, tuple(chunk)))

    def _meter(self, ledger: LedgerWriter, variant: str, batch: Batch, batch_id: int, cost: int,
               plain: list[Pending], shares: list[int], statuses: list[int] | None, now: float,
               wall: float) -> None:
        """The batch, and the usage of its plain requests, into the ledger's batch log: a
        column per field, each read by a comprehension (3.11 specializes their slot reads: a
        third of the time of map() over a dotted attrgetter), no other step per request."""
        n = len(plain)
        tenants = [item.context.tenant for item in plain]
        tenant: str | list[str] = tenants
        if n and tenants.count(tenants[0]) == n:
            tenant = tenants[0]
            self.stats.cost_pusd[tenant] += sum(shares)
        else:
            for name, share in zip(tenants, shares, strict=True):
                self.stats.cost_pusd[name] += share
        ids = [item.context.id for item in plain]
        rows = None  # every item holds a row at least: as many rows as items means one each
        if plain is not batch.items or batch.rows != n:
            rows = [item.rows for item in plain]
            if sum(rows) == n:
                rows = None
        ledger.log.record(
            self._log_keys[variant], batch_id, ledger.reserve_ids(n + 1), batch.started_at,
            batch.rows, len(batch.items), batch.compute_s * 1000, cost, batch.dispatched, now,
            wall, [item.arrival for item in plain], shares, tenant,
            items=rows, statuses=statuses,
            request_ids=None if ids.count(None) == n else ids)

    def _failed(self, error: BaseException) -> ModelFailed:
        return ModelFailed(f"model '{self.model}' version {self.version} failed: {error}")

    def _advance(self, part: Part, item: Pending, share: int, batch: Batch, offset: int,
                 confidence: np.ndarray | None, now: float) -> tuple[str, Flow] | None:
        """A cascade part's rows came back from a stage: keep the confident ones, send the
        rest to the next stage. Returns (path, flow) when the flow has every row."""
        flow = part.flow
        flow.cost += share
        flow.compute_s += batch.compute_s
        flow.depth = max(flow.depth, part.depth)
        rows = item.rows
        if batch.error is not None:
            flow.status = 500
            if not flow.future.done():
                flow.future.set_exception(self._failed(batch.error))
            flow.open_rows -= rows
        else:
            end = offset + rows
            outs = batch.outputs
            if len(batch.items) > 1:
                outs = {k: v[offset:end] for k, v in outs.items()}
            threshold = flow.route[part.depth][2]
            low = None if threshold is None else confidence[offset:end] < threshold
            if low is None or not low.any():
                _keep(flow, part.index, outs)
                flow.open_rows -= rows
            else:
                self.stats.escalated[flow.route[part.depth][1]] += int(low.sum())
                if low.all():
                    inputs, index = item.inputs, part.index
                else:
                    sure = ~low
                    _keep(flow, np.flatnonzero(sure) if part.index is None
                          else part.index[sure], {k: v[sure] for k, v in outs.items()})
                    flow.open_rows -= int(sure.sum())
                    go = np.flatnonzero(low)
                    inputs = {k: v[go] for k, v in item.inputs.items()}
                    index = go if part.index is None else part.index[go]
                self._escalate(flow, part.depth + 1, inputs, index, item.expires, now)
        if flow.open_rows == 0:
            return _path(flow), flow
        return None

    def _escalate(self, flow: Flow, depth: int, inputs: dict[str, np.ndarray],
                  index: np.ndarray | None, expires: float | None, now: float) -> None:
        rows = len(next(iter(inputs.values())))
        try:
            flow.route[depth][0].submit(Pending(inputs, rows, now, now + self.max_queue_delay_s,
                                                expires, flow.future, Part(flow, depth, index)))
        except InferenceError as exc:  # the next stage is full or unloading: these rows fail
            flow.status = exc.status
            if not flow.future.done():
                flow.future.set_exception(exc)
            flow.open_rows -= rows

    def _close(self, flow: Flow, now: float, wall: float, batch_rows: int = 0) -> tuple:
        """Answer (or account for) a flow whose rows are all done; its usage record."""
        request, future, stats = flow.request, flow.future, self.stats
        total_s = now - flow.arrival
        status = flow.status
        if status == 200 and future.done():
            status = 499
        if status == 200:
            outs = flow.outputs
            wanted = request.outputs if request.outputs is not None else self._declared
            if wanted is not None:
                outs = {k: outs[k] for k in wanted}
            future.set_result(InferenceResponse(
                self.model, self.version, outs, request.id, request.parameters, flow.cost,
                total_s - flow.compute_s, flow.compute_s, batch_rows, _path(flow)))
            stats.ok += 1
            stats.queue.observe(total_s - flow.compute_s)
            stats.total.observe(total_s)
        else:
            stats.errors[status] += 1
        if request.budget is not None:
            settle(request.budget, request.reserved, flow.cost)
        stats.cost_pusd[request.tenant] += flow.cost
        return (0 if self.ledger is None else self.ledger.reserve_ids(), request.id,
                wall - total_s, request.tenant, flow.rows, (total_s - flow.compute_s) * 1000,
                total_s * 1000, flow.cost, status)

    def _dropped(self, item: Pending, status: int) -> None:
        """A queued item its batcher took off unserved (504: past its timeout; 499: its caller
        left): recorded at zero cost, never computed."""
        part = item.context
        if type(part) is not Part:
            self.reject(part, status, item.arrival)
            return
        flow = part.flow
        if flow.status == 200:  # a flow that failed already keeps that status
            flow.status = status
        flow.open_rows -= item.rows
        if flow.open_rows == 0:
            record = self._close(flow, time.perf_counter(), time.time())
            if self.ledger is not None:
                self.ledger.add_usage(UsageChunk(self.ledger.reserve_ids(), record[2], self.model,
                                                 self.version, _path(flow), None, 0, 0.0,
                                                 (record,)))

    def reject(self, request: InferenceRequest, status: int, arrival: float) -> None:
        """A request that never ran: counted, and recorded at zero cost."""
        self.stats.errors[status] += 1
        if request.budget is not None:  # admitted, then refused or expired: release it
            settle(request.budget, request.reserved, 0)
            request.budget = None
        ledger = self.ledger
        if ledger is not None:
            total_s = time.perf_counter() - arrival
            ts = time.time() - total_s
            record = (ledger.reserve_ids(), request.id, ts, request.tenant, 0, 0.0,
                      total_s * 1000, 0, status)
            ledger.add_usage(UsageChunk(ledger.reserve_ids(), ts, self.model, self.version, None,
                                        None, 0, 0.0, (record,)))

    def example_inputs(self, rows: int) -> dict[str, np.ndarray]:
        """Zeros of the declared shapes, for warm-up."""
        feeds = {}
        for spec in self.inputs:
            shape = (rows, *(d if d > 0 else 1 for d in spec.shape[1:]))
            if spec.datatype == "BYTES":
                feeds[spec.name] = np.full(shape, b"", dtype=object)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=spec.dtype)
        return feeds


_REF_STAGE = Stage(REFERENCE)


def _path(flow: Flow) -> str:
    return ">".join(variant for _b, variant, _t in flow.route[:flow.depth + 1])


def _keep(flow: Flow, index: np.ndarray | None, outs: dict[str, np.ndarray]) -> None:
    """Put answered rows into the flow's outputs (no copy when one piece answers them all)."""
    if index is None:
        flow.outputs = outs
        return
    if flow.outputs is None:
        flow.outputs = {k: np.empty((flow.rows, *v.shape[1:]), v.dtype) for k, v in outs.items()}
    for k, v in outs.items():
        flow.outputs[k][index] = v
