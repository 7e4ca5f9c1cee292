"""API keys: who is calling, which tenant pays, and whether they may administer the server.

A key is `fsk_<key id>_<secret>`: the id (12 hex characters) names the key in lists and logs,
the secret is 256 random bits. Only the SHA-256 of the whole key is stored, so a stolen ledger
gives no usable key; the key itself is shown once, when it is created. (A plain hash is enough:
the secret has 256 bits of entropy, so there is nothing for a slow password hash to protect.)
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from sqlalchemy import Boolean, Column, Engine, Float, Integer, String, Table, select, update

from .ledger import metadata

KEY_PREFIX = "fsk_"
TIERS = ("free", "economy", "standard", "premium")  # a plan tier of the same name serves it

api_keys = Table(
    "api_keys",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("key_id", String(32), nullable=False, unique=True),
    Column("key_hash", String(64), nullable=False, unique=True),  # sha256 hex of the whole key
    Column("tenant", String(256), nullable=False),
    Column("tier", String(32), nullable=False),
    Column("admin", Boolean, nullable=False),
    Column("created_at", Float, nullable=False),
    Column("revoked_at", Float),  # null: active
    Column("name", String(256)),
)


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    tenant: str
    tier: str
    admin: bool
    created_at: float = 0.0
    revoked_at: float | None = None
    name: str | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def hash_key(key: str | bytes) -> str:
    return hashlib.sha256(key.encode() if isinstance(key, str) else key).hexdigest()


def create_key(engine: Engine, tenant: str, tier: str = "standard", admin: bool = False,
               name: str | None = None) -> tuple[KeyInfo, str]:
    """A new key for a tenant: (its record, the key itself, to show once)."""
    tenant = tenant.strip()
    if not tenant:
        raise ValueError("a key needs a tenant")
    if len(tenant) > 256:
        raise ValueError("tenant names are at most 256 characters")
    if name is not None and len(name) > 256:  # PostgreSQL refused it at insert
        raise ValueError("key names are at most 256 characters")
    if tier not in TIERS:
        raise ValueError(f"tier {tier!r}: choose one of {', '.join(TIERS)}")
    key_id = secrets.token_hex(6)
    key = f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"
    now = time.time()
    with engine.begin() as conn:
        conn.execute(api_keys.insert().values(
            key_id=key_id, key_hash=hash_key(key), tenant=tenant, tier=tier, admin=admin,
            created_at=now, name=name))
    return KeyInfo(key_id, tenant, tier, admin, now, None, name), key


def revoke_key(engine: Engine, key_id: str) -> bool:
    """Revoke a key by its id; False when there is no such active key."""
    with engine.begin() as conn:
        result = conn.execute(update(api_keys)
                              .where(api_keys.c.key_id == key_id, api_keys.c.revoked_at.is_(None))
                              .values(revoked_at=time.time()))
        return result.rowcount > 0


def list_keys(engine: Engine, include_revoked: bool = True) -> list[KeyInfo]:
    query = select(api_keys).order_by(api_keys.c.id)
    if not include_revoked:
        query = query.where(api_keys.c.revoked_at.is_(None))
    with engine.connect() as conn:
        return [_info(row) for row in conn.execute(query)]


def load_key_table(engine: Engine) -> dict[str, KeyInfo]:
    """Every key by its hash, revoked ones included (so a revoked key can be told apart)."""
    with engine.connect() as conn:
        return {row.key_hash: _info(row) for row in conn.execute(select(api_keys))}


def _info(row) -> KeyInfo:
    return KeyInfo(row.key_id, row.tenant, row.tier, bool(row.admin), row.created_at,
                   row.revoked_at, row.name)
