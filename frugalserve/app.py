"""Wiring: a repository, a rate card and a ledger become one ASGI application."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .economics.ledger import LedgerWriter, open_engine, sqlite_url
from .economics.ratecard import RateCard
from .protocols.v2_rest import DEFAULT_MAX_BODY_BYTES, V2App
from .repository import ModelRepository
from .serving import DataPlane

LEDGER_FILE = "frugalserve-ledger.db"


@dataclass
class ServerSettings:
    repository: Path
    ledger_url: str | None = None  # default: SQLite file next to the repository
    rate_card: Path | None = None
    metering: bool = True
    poll_interval_s: float | None = 2.0
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    flush_interval_s: float = 0.5

    def resolved_ledger_url(self) -> str:
        if self.ledger_url:
            return self.ledger_url
        return sqlite_url(Path(self.repository).resolve().parent / LEDGER_FILE)


def build_app(settings: ServerSettings) -> V2App:
    repository = ModelRepository(settings.repository)
    ledger = None
    if settings.metering:
        engine = open_engine(settings.resolved_ledger_url())
        ledger = LedgerWriter(engine, settings.flush_interval_s,
                              spill_dir=Path(settings.repository).resolve().parent)
    dataplane = DataPlane(repository, RateCard.load(settings.rate_card), ledger,
                          settings.poll_interval_s)
    return V2App(dataplane, settings.max_body_bytes)
