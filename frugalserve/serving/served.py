"""One model version being served: its signature check, its batcher, its meter."""

from __future__ import annotations

import time

import numpy as np

from ..economics.ledger import LedgerWriter
from ..economics.meter import Meter, split_cost
from ..repository import DeviceConfig, LoadedVersion, ModelConfig
from ..tensors import TensorSpec, datatype_of
from .admission import settle
from .batcher import Batch, Batcher, Pending
from .errors import BadInput, ModelFailed
from .metrics import VersionStats
from .types import InferenceRequest, InferenceResponse

_sum = np.add.reduce  # ndarray.sum() adds a Python-level wrapper on the hot path


def _fits(shape: tuple[int, ...], declared: tuple[int, ...]) -> bool:
    return all(d == -1 or d == n for d, n in zip(declared[1:], shape[1:], strict=True))


class ServedVersion:
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
        self.device: DeviceConfig = config.device
        self.meter = meter
        self.stats = stats
        self.ledger = ledger if meter is not None else None
        b = config.batching
        self.max_batch_size = b.max_batch_size
        self.max_queue_delay_s = b.max_queue_delay_ms / 1000
        self.batcher = Batcher(
            loaded.runtime.predict, self._finish, self._expired,
            max_batch_size=b.max_batch_size, max_queue_delay_s=self.max_queue_delay_s,
            max_queue_size=b.max_queue_size, instances=b.instances,
            name=f"{model}/{loaded.version}",
        )

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
        expires = None if request.timeout_s is None else arrival + request.timeout_s
        self.batcher.submit(Pending(request.inputs, rows, arrival,
                                    arrival + self.max_queue_delay_s, expires, future, request))

    # -- metering and completion (event loop thread) -----------------------------------------

    def _finish(self, batch: Batch) -> None:
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
            shares = [cost] if len(items) == 1 else split_cost(cost, [it.rows for it in items])
            batch_id = next(ledger.ids)
            ledger.add_batch((batch_id, batch.started_at, self.model, self.version,
                              self.device.type, self.device.pricing, self.device.share,
                              batch.rows, len(items), compute_s * 1000, cost))
            records: list[tuple] = []
        else:
            shares = [0] * len(items)
        outputs, error = batch.outputs, batch.error
        sliced = len(items) > 1
        dispatched = batch.dispatched
        now = time.perf_counter()
        wall = time.time()
        offset = 0
        for item, share in zip(items, shares, strict=True):
            request: InferenceRequest = item.context
            future = item.future
            queue_s = dispatched - item.arrival
            total_s = now - item.arrival
            if error is not None:
                status = 500
                if not future.done():
                    future.set_exception(ModelFailed(
                        f"model '{self.model}' version {self.version} failed: {error}"))
                stats.errors[status] += 1
            elif future.done():  # the caller went away; the work was still done and paid
                status = 499
                stats.errors[status] += 1
            else:
                status = 200
                if sliced:
                    end = offset + item.rows
                    outs = {k: v[offset:end] for k, v in outputs.items()}
                else:
                    outs = outputs
                if request.outputs is not None:
                    outs = {k: outs[k] for k in request.outputs}
                future.set_result(InferenceResponse(
                    self.model, self.version, outs, request.id, request.parameters, share,
                    queue_s, compute_s, batch.rows))
                stats.ok += 1
                stats.queue.observe(queue_s)
                stats.total.observe(total_s)
            offset += item.rows
            if request.budget is not None:  # its reservation out, its share in
                settle(request.budget, request.reserved, share)
            if ledger is not None:
                stats.cost_pusd[request.tenant] += share
                # tuples of atoms: the GC stops tracking them, so waiting records cost it nothing
                records.append((next(ledger.ids), request.id, wall - total_s, request.tenant,
                                item.rows, queue_s * 1000, total_s * 1000, share, status))
        if ledger is not None:
            ledger.add_usage((next(ledger.ids), records[0][2], self.model, self.version,
                              batch_id, batch.rows, compute_s * 1000, tuple(records)))

    def _expired(self, item: Pending) -> None:
        self.reject(item.context, 504, item.arrival)

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
            record = (next(ledger.ids), request.id, ts, request.tenant, 0, 0.0, total_s * 1000,
                      0, status)
            ledger.add_usage((next(ledger.ids), ts, self.model, self.version, None, 0, 0.0,
                              (record,)))

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
