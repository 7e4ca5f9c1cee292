"""The protocol-agnostic core: owns the request path from admission to metering.

Protocols hand it an InferenceRequest and get an InferenceResponse or an InferenceError;
it never knows which protocol called (Seldon MLServer's DataPlane pattern).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .. import __version__
from ..economics.ledger import LedgerWriter
from ..economics.meter import Meter
from ..economics.ratecard import RateCard, RateCardError
from ..repository import LoadedModel, ModelRepository, RepositoryError
from ..repository.repository import CONFIG_FILE
from .admission import Admission
from .errors import InferenceError, NotFound, Unavailable
from .metrics import ServingMetrics
from .served import ServedVersion
from .types import InferenceRequest, InferenceResponse

log = logging.getLogger("frugalserve.serving")

READY, LOADING, UNAVAILABLE, FAILED = "READY", "LOADING", "UNAVAILABLE", "FAILED"


@dataclass
class ServedModel:
    name: str
    loaded: LoadedModel
    versions: dict[str, ServedVersion]
    default: ServedVersion

    async def drain(self) -> None:
        await asyncio.gather(*(v.drain() for v in self.versions.values()))
        self.loaded.close()


class DataPlane:
    def __init__(self, repository: ModelRepository, rate_card: RateCard, admission: Admission,
                 ledger: LedgerWriter | None = None, poll_interval_s: float | None = None):
        self.repository = repository
        self.admission = admission  # keys and budgets (an Admission(None) has neither)
        self.rate_card = rate_card
        self.ledger = ledger  # None: metering off (no costs, no usage records)
        self.poll_interval_s = poll_interval_s
        self.metrics = ServingMetrics()
        self._models: dict[str, ServedModel] = {}
        self._states: dict[str, tuple[str, str]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._fingerprints: dict[str, tuple] = {}
        self._watcher: asyncio.Task | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = False

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        if self.ledger is not None:
            self.ledger.start()
        await self.admission.start(self._resolve)
        for name in await asyncio.to_thread(self.repository.names):
            self._fingerprints[name] = await asyncio.to_thread(self.repository.fingerprint, name)
            try:
                await self.load_model(name)
            except InferenceError:
                pass  # logged with its file and reason; the other models keep serving
        if self.poll_interval_s:
            self._watcher = asyncio.create_task(self._watch(), name="repository-watcher")
        self._ready = True

    async def stop(self) -> None:
        """Finish every queued request, then flush the ledger."""
        self._ready = False
        if self._watcher is not None:
            self._watcher.cancel()
        models, self._models = list(self._models.values()), {}
        await asyncio.gather(*(m.drain() for m in models))
        await self.admission.stop()
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.close)

    # -- the request path --------------------------------------------------------------------

    async def infer(self, request: InferenceRequest) -> InferenceResponse:
        try:
            served = self._resolve(request.model, request.version)
        except InferenceError as exc:  # no version to bill: counted under model="" only
            self.metrics.unresolved[exc.status] += 1
            raise
        arrival = time.perf_counter()
        future = self._loop.create_future()
        try:
            rows = served.check(request)
            admission = self.admission
            if admission.active:
                served, rows = admission.admit(request, served, rows)
            served.submit(request, rows, arrival, future)
        except InferenceError as exc:
            served.reject(request, exc.status, arrival)
            raise
        return await future

    def authenticate(self, authorization: bytes | None,
                     tenant_label: bytes | None) -> tuple[str, str | None]:
        """The tenant to bill and its plan tier, from the request's Authorization header value
        (Bearer key); tenant_label (X-Tenant) counts only for anonymous requests on a trusting
        server. Anonymous requests get each plan's default tier (None)."""
        return self.admission.authenticate(authorization, tenant_label)

    def authorize_admin(self, authorization: bytes | None) -> None:
        """Raise Unauthorized (401) or Forbidden (403) unless an admin may do this."""
        self.admission.authorize_admin(authorization)

    def _resolve(self, model: str, version: str | None) -> ServedVersion:
        entry = self._models.get(model)
        if entry is None:
            state, reason = self._states.get(model, (None, ""))
            if state == LOADING:
                raise Unavailable(f"model '{model}' is loading")
            if state is None:
                raise NotFound(f"unknown model '{model}'")
            raise NotFound(f"model '{model}' is not available ({state.lower()}"
                           + (f": {reason})" if reason else ")"))
        if version is None:
            return entry.default
        served = entry.versions.get(version)
        if served is None:
            raise NotFound(f"model '{model}' has no version '{version}'; "
                           f"it has {sorted(entry.versions, key=int)}")
        return served

    # -- metadata ----------------------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._ready

    def server_metadata(self) -> dict:
        return {"name": "frugalserve", "version": __version__,
                "extensions": ["binary_tensor_data", "model_repository", "cost_metering"]}

    def model_metadata(self, model: str, version: str | None = None) -> dict:
        served = self._resolve(model, version)
        entry = self._models[model]
        return {
            "name": model,
            "versions": sorted(entry.versions, key=int) if version is None else [version],
            "platform": served.loaded.runtime.name,
            "inputs": [s.as_dict() for s in served.inputs],
            "outputs": [s.as_dict() for s in served.outputs],
        }

    def model_ready(self, model: str, version: str | None = None) -> bool:
        self._resolve(model, version)
        return True

    def served_versions(self) -> Iterator[ServedVersion]:
        for entry in self._models.values():
            yield from entry.versions.values()

    def queue_depths(self) -> Iterator[tuple[str, str, int]]:
        for served in self.served_versions():
            yield served.model, served.version, served.queued

    # -- repository --------------------------------------------------------------------------

    def repository_index(self) -> list[dict]:
        index = []
        for name in sorted(set(self._states) | set(self._fingerprints)):
            state, reason = self._states.get(name, (UNAVAILABLE, "not loaded"))
            entry = self._models.get(name)
            versions = sorted(entry.versions, key=int) if entry else [""]
            for v in versions:
                index.append({"name": name, "version": v, "state": state, "reason": reason})
        return index

    async def load_model(self, name: str) -> None:
        """Load (or reload) a model from the repository. A reload that fails leaves the
        running version serving; a reload that succeeds drains the old one."""
        async with self._locks.setdefault(name, asyncio.Lock()):
            previous = self._states.get(name)
            if name not in self._models:
                self._states[name] = (LOADING, "")
            try:
                entry = await asyncio.to_thread(self._build, name)
            except RepositoryError as exc:
                log.error("cannot load model '%s': %s", name, exc)
                if name in self._models:
                    self._states[name] = previous or (READY, "")
                    raise Unavailable(f"reload of '{name}' failed, previous kept: {exc}") from exc
                self._states[name] = (FAILED, str(exc))
                raise NotFound(f"cannot load model '{name}': {exc}") from exc
            for served in entry.versions.values():
                served.start()
            old = self._models.get(name)
            self._models[name] = entry
            self._states[name] = (READY, "")
            log.info("model '%s' ready (versions %s)", name, ", ".join(entry.versions))
            if old is not None:
                await old.drain()

    async def unload_model(self, name: str) -> None:
        async with self._locks.setdefault(name, asyncio.Lock()):
            entry = self._models.pop(name, None)
            if entry is None:
                raise NotFound(f"model '{name}' is not loaded")
            self._states[name] = (UNAVAILABLE, "unloaded")
            await entry.drain()
            log.info("model '%s' unloaded", name)

    def _build(self, name: str) -> ServedModel:
        """Blocking: read the model from disk, price its device, warm up every version."""
        loaded = self.repository.load(name)
        try:
            device = loaded.config.device
            try:
                price = self.rate_card.device(device.type).usd_per_hour(device.pricing)
            except RateCardError as exc:
                config_file = self.repository.root / name / CONFIG_FILE
                raise RepositoryError(f"{config_file}: device: {exc}") from exc
            meter = Meter(price, device.share) if self.ledger is not None else None
            versions = {}
            for v, lv in loaded.versions.items():
                stats = self.metrics.for_version(loaded.name, v)
                served = ServedVersion(loaded.name, lv, loaded.config, meter, stats, self.ledger)
                try:
                    served.warm_up()
                except Exception as exc:  # noqa: BLE001 - any engine failure fails the load
                    raise RepositoryError(f"{lv.runtime.path}: warm-up prediction on zeros "
                                          f"failed: {exc}") from exc
                versions[v] = served
        except Exception:
            loaded.close()
            raise
        return ServedModel(loaded.name, loaded, versions, versions[loaded.latest])

    async def _watch(self) -> None:
        """Triton's poll mode: reload a model whose files changed, load new ones, unload gone."""
        while True:
            await asyncio.sleep(self.poll_interval_s)
            try:
                names = await asyncio.to_thread(self.repository.names)
                for name in names:
                    stamp = await asyncio.to_thread(self.repository.fingerprint, name)
                    if stamp != self._fingerprints.get(name):
                        self._fingerprints[name] = stamp
                        try:
                            await self.load_model(name)
                        except InferenceError:
                            pass  # logged; the previous version (if any) keeps serving
                for gone in set(self._fingerprints) - set(names):
                    del self._fingerprints[gone]
                    if gone in self._models:
                        await self.unload_model(gone)
            except Exception:  # noqa: BLE001 - the watcher must outlive a bad poll
                log.exception("repository poll failed")
