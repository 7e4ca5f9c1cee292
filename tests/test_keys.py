"""API keys and tenants: Bearer keys bill their tenant, admin routes need an admin key, a wrong
or revoked key gets 401 and costs nothing, and anonymous access follows the configuration."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
import support
from conftest import DIGITS_CONFIG
from ledger_support import rows as query
from sqlalchemy import select
from typer.testing import CliRunner

from frugalserve.cli import app
from frugalserve.economics import keys
from frugalserve.economics.ledger import open_engine


@pytest.fixture
def keyed(tmp_path, artifacts):
    repo = tmp_path / "models"
    support.write_model(repo, "digits", {"1": artifacts.lr_onnx}, DIGITS_CONFIG)
    support.write_model(repo, "spare", {"1": artifacts.lr_onnx}, DIGITS_CONFIG)
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    return repo, url


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def infer(client, artifacts, headers=None, rid=None, model="digits"):
    body = support.json_body({"X": artifacts.X[:1]}, id=rid or uuid.uuid4().hex)
    return client.post(f"/v2/models/{model}/infer", json=body, headers=headers or {})


def usage_rows(url: str) -> list[dict]:
    columns = ("request_id", "tenant", "cost_pusd", "status")
    return [dict(zip(columns, r, strict=True))
            for r in query(url, f"SELECT {', '.join(columns)} FROM usage")]


def test_keys_are_stored_hashed_and_shown_once(tmp_path):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    runner = CliRunner()
    result = runner.invoke(app, ["keys", "create", "--tenant", "team-a", "--tier", "standard",
                                 "--admin", "--ledger", url])
    assert result.exit_code == 0, result.output
    secret = next(line for line in result.output.splitlines() if line.startswith("fsk_"))
    engine = open_engine(url)
    with engine.connect() as conn:
        row = conn.execute(select(keys.api_keys)).one()
    assert row.key_hash == keys.hash_key(secret) and secret not in str(tuple(row))
    assert (row.tenant, row.tier, row.admin, row.revoked_at) == ("team-a", "standard", True, None)

    listed = runner.invoke(app, ["keys", "list", "--ledger", url])
    assert listed.exit_code == 0 and row.key_id in listed.output and secret not in listed.output
    assert runner.invoke(app, ["keys", "revoke", row.key_id, "--ledger", url]).exit_code == 0
    assert keys.list_keys(engine)[0].revoked_at is not None
    again = runner.invoke(app, ["keys", "revoke", row.key_id, "--ledger", url])
    assert again.exit_code != 0  # already revoked
    bad = runner.invoke(app, ["keys", "create", "--tenant", "x", "--tier", "gold",
                              "--ledger", url])
    assert bad.exit_code != 0 and "tier" in bad.output


@pytest.mark.parametrize("transport", support.TRANSPORTS)
def test_keys_bill_their_tenant_and_bad_keys_cost_nothing(keyed, artifacts, transport):
    repo, url = keyed
    engine = open_engine(url)
    _, key_a = keys.create_key(engine, "team-a")
    _, key_b = keys.create_key(engine, "team-b", tier="premium")
    revoked, key_r = keys.create_key(engine, "team-r")
    keys.revoke_key(engine, revoked.key_id)
    settings = support.settings(repo, ledger_url=url, admission_refresh_s=0.2)
    ids = {}
    with support.LiveServer(settings, transport=transport) as live, live.client() as c:
        for name, headers in (("a", bearer(key_a)), ("b", bearer(key_b)),
                              # the key names the tenant; X-Tenant cannot override it
                              ("a2", {**bearer(key_a), "X-Tenant": "team-b"})):
            ids[name] = uuid.uuid4().hex
            r = infer(c, artifacts, headers, ids[name])
            assert r.status_code == 200, r.text
            assert r.json()["parameters"]["cost_pico_usd"] > 0

        # keys exist, so anonymous requests are refused (the default: allowed only while none)
        r = infer(c, artifacts, rid="anon")
        assert r.status_code == 401 and "API key is required" in r.json()["error"]
        assert r.headers["www-authenticate"].startswith("Bearer")
        for headers, message in (
                (bearer("fsk_000000000000_wrong"), "invalid API key"),
                (bearer(key_r), f"API key {revoked.key_id} was revoked"),
                ({"Authorization": f"Basic {key_a}"}, "must be 'Bearer <key>'"),
                ({"Authorization": "Bearer"}, "must be 'Bearer <key>'")):
            r = infer(c, artifacts, headers, rid="refused")
            assert r.status_code == 401, r.text
            assert message in r.json()["error"]

        # a key made while the server runs works at once (an unknown key reloads the table,
        # at most once a second); one revoked while it runs stops within the refresh interval
        _, key_c = keys.create_key(engine, "team-c")
        support.wait_for(lambda: infer(c, artifacts, bearer(key_c)).status_code == 200, 10,
                         what="the new key to be accepted")
        revoked_b = next(k for k in keys.list_keys(engine) if k.tenant == "team-b")
        keys.revoke_key(engine, revoked_b.key_id)
        support.wait_for(lambda: infer(c, artifacts, bearer(key_b)).status_code == 401, 10,
                         what="the revoked key to be refused")
        assert "revoked" in infer(c, artifacts, bearer(key_b)).json()["error"]
    engine.dispose()

    rows = usage_rows(url)
    by_id = {r["request_id"]: r for r in rows}
    assert by_id[ids["a"]]["tenant"] == "team-a"
    assert by_id[ids["b"]]["tenant"] == "team-b"
    assert by_id[ids["a2"]]["tenant"] == "team-a"
    # refused before anything ran: no usage record at all, so certainly none with a cost
    assert "anon" not in by_id and "refused" not in by_id
    assert {r["tenant"] for r in rows if r["cost_pusd"]} <= {"team-a", "team-b", "team-c"}


def test_admin_routes_need_an_admin_key(keyed, artifacts):
    repo, url = keyed
    engine = open_engine(url)
    _, user = keys.create_key(engine, "team-a")
    admin_info, admin = keys.create_key(engine, "ops", admin=True)
    engine.dispose()
    with support.LiveServer(support.settings(repo, ledger_url=url)) as live, \
            live.client() as c:
        assert c.post("/v2/repository/index").status_code == 401
        r = c.post("/v2/repository/index", headers=bearer(user))
        assert r.status_code == 403 and "not an admin key" in r.json()["error"]
        assert c.post("/v2/repository/models/spare/unload", headers=bearer(user)).status_code \
            == 403
        assert c.post("/v2/repository/index", headers=bearer("fsk_nope")).status_code == 401
        r = c.post("/v2/repository/index", headers=bearer(admin))
        assert r.status_code == 200 and {m["name"] for m in r.json()} == {"digits", "spare"}
        assert c.post("/v2/repository/models/spare/unload", headers=bearer(admin)) \
            .status_code == 200
        assert c.post("/v2/repository/models/spare/load", headers=bearer(admin)) \
            .status_code == 200
        # an admin key is also a tenant key: it can infer, billed to its tenant
        assert infer(c, artifacts, bearer(admin)).status_code == 200
        # metrics and health stay open
        assert c.get("/metrics").status_code == 200
        assert c.get("/v2/health/ready").status_code == 200


def test_anonymous_access_follows_the_setting(keyed, artifacts):
    repo, url = keyed
    # no key in the ledger: anonymous allowed by default, admin routes too
    with support.LiveServer(support.settings(repo, ledger_url=url)) as live, \
            live.client() as c:
        assert infer(c, artifacts).status_code == 200
        assert c.post("/v2/repository/index").status_code == 200
    # never: refused even with no key in the ledger
    with support.LiveServer(support.settings(repo, ledger_url=url, allow_anonymous=False)) \
            as live, live.client() as c:
        r = infer(c, artifacts)
        assert r.status_code == 401 and "Bearer" in r.json()["error"]
    engine = open_engine(url)
    _, key = keys.create_key(engine, "team-a")
    engine.dispose()
    # always: anonymous allowed although keys exist; keys still bill their tenant
    rid = uuid.uuid4().hex
    with support.LiveServer(support.settings(repo, ledger_url=url, allow_anonymous=True,
                                             trust_tenant_header=False)) as live, \
            live.client() as c:
        assert infer(c, artifacts, {"X-Tenant": "spoofed"}, rid="anon-ok").status_code == 200
        assert infer(c, artifacts, bearer(key), rid=rid).status_code == 200
    by_id = {r["request_id"]: r for r in usage_rows(url)}
    assert by_id["anon-ok"]["tenant"] == "anonymous"  # X-Tenant is not trusted by default
    assert by_id[rid]["tenant"] == "team-a"


def test_many_keys_are_answered_from_memory(keyed, artifacts):
    """After the first request per key, a key costs one dict lookup: a hundred requests over
    three keys hash each key once (the table is cached; the database is not read per
    request)."""
    repo, url = keyed
    engine = open_engine(url)
    secrets = [keys.create_key(engine, f"t{i}")[1] for i in range(3)]
    engine.dispose()
    x = np.asarray(artifacts.X[:1])
    with support.LiveServer(support.settings(repo, ledger_url=url)) as live:
        admission = live.dataplane.admission
        reqs = [support.Req("POST", "/v2/models/digits/infer", json=support.json_body({"X": x}),
                            headers=bearer(secrets[i % 3])) for i in range(100)]
        replies = support.run_concurrently(live.url, reqs)
        assert [r.status_code for r in replies] == [200] * 100
        assert len(admission._memo) == 3
