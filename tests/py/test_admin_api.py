"""Bad input to the key and project API (exact status and `{"error","message"}`),
nothing stored lost after any of it; a JWKS without kid in the config; and the per-project
handshake gates (disabled, Origin, connection cap)."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess

import pytest
from websockets.exceptions import InvalidStatus

from conftest import Servers
from herald_client import ADMIN_KEY, close_all, expect_refusal, herald_bin, run
from keytools import (
    assert_status,
    b64url,
    connect_ok,
    create_project,
    delete_key,
    hmac_token,
    make_key,
    project_toml,
    put_key,
    refused_401,
    server_toml,
)

BAD_PEM = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"


@pytest.fixture(scope="module")
def admin(tmp_path_factory):
    """Project `shop` with config key `k1` (HS256) and API keys `es` (ES256 PEM) and `ed`
    (EdDSA JWK) registered at setup."""
    k1, es, ed = make_key("HS256"), make_key("ES256"), make_key("EdDSA")
    config = server_toml(
        project_toml("shop", api_key="shop-api-key-0123456789", keys=k1.config_toml("k1"))
    )
    servers = Servers(tmp_path_factory.mktemp("admin"))
    server = servers.start(config=config)
    assert_status(put_key(server, "shop", "es", es.spec()), 204)
    assert_status(put_key(server, "shop", "ed", ed.jwk("ed")), 204)
    yield {"server": server, "keys": {"k1": k1, "es": es, "ed": ed}, "rsa": make_key("RS256")}
    servers.teardown()


def _stored_keys_still_work(admin):
    server = admin["server"]

    async def go():
        for kid, key in admin["keys"].items():
            ws, _ = await connect_ok(server, "shop", key.token("kim", kid=kid), "kim")
            await ws.close()

    run(go(), timeout=20)


def _bad_puts(admin):
    rsa_pem = admin["rsa"].public_pem
    big = "-----BEGIN PUBLIC KEY-----\n" + "A" * (70 * 1024) + "\n-----END PUBLIC KEY-----\n"
    ec_jwk = make_key("ES256").jwk(None, with_alg=False)
    rsa_jwk_no_alg = admin["rsa"].jwk(None, with_alg=False)
    # (project, kid, body, status, error)
    return {
        "malformed-pem": ("shop", "new", {"alg": "ES256", "pem": BAD_PEM}, 400, "bad_request"),
        "garbage-pem": ("shop", "new", {"alg": "RS256", "pem": "not a pem"}, 400, "bad_request"),
        # A PEM that parses, but of another family than the alg.
        "rsa-pem-for-es256": ("shop", "new", {"alg": "ES256", "pem": rsa_pem}, 400, "bad_request"),
        "pem-for-hs256": ("shop", "new", {"alg": "HS256", "pem": rsa_pem}, 400, "bad_request"),
        "secret-for-rs256": (
            "shop", "new", {"alg": "RS256", "secret": "0123456789abcdef0123"}, 400, "bad_request",
        ),
        # Replacing a stored key with a bad one must leave the stored one in force.
        "malformed-pem-over-stored-kid": (
            "shop", "es", {"alg": "ES256", "pem": BAD_PEM}, 400, "bad_request",
        ),
        "unknown-alg": ("shop", "new", {"alg": "HS999", "secret": "0123456789abcdef0123"}, 400,
                        "bad_request"),
        "alg-none": ("shop", "new", {"alg": "none", "secret": "0123456789abcdef0123"}, 400,
                     "bad_request"),
        "es512-unsupported": ("shop", "new", {"alg": "ES512", "pem": rsa_pem}, 400, "bad_request"),
        "no-alg": ("shop", "new", {"pem": rsa_pem}, 400, "bad_request"),
        "short-hs-secret": ("shop", "new", {"alg": "HS256", "secret": "fifteen-bytes!!"}, 400,
                            "bad_request"),
        "short-hs-secret-over-stored-kid": (
            "shop", "k1", {"alg": "HS256", "secret": "short"}, 400, "bad_request",
        ),
        "secret-and-pem": ("shop", "new", {"alg": "RS256", "pem": rsa_pem,
                                           "secret": "0123456789abcdef0123"}, 400, "bad_request"),
        "no-material": ("shop", "new", {"alg": "RS256"}, 400, "bad_request"),
        "jwk-bad-coordinates": (
            "shop", "new", {**ec_jwk, "x": "AAAA"}, 400, "bad_request",
        ),
        "jwk-rsa-without-alg": ("shop", "new", rsa_jwk_no_alg, 400, "bad_request"),
        "jwk-kid-differs-from-path": ("shop", "new", {**ec_jwk, "kid": "other"}, 400,
                                      "bad_request"),
        "jwk-alg-mismatch": ("shop", "new", {**ec_jwk, "alg": "RS256"}, 400, "bad_request"),
        "jwks-document-as-body": (
            "shop", "new", {"keys": [make_key("ES256").jwk("new")]}, 400, "bad_request",
        ),
        "not-json": ("shop", "new", b"{not json", 400, "bad_request"),
        "bad-kid": ("shop", "a%20b", {"alg": "ES256", "pem": make_key("ES256").public_pem}, 400,
                    "bad_request"),
        "unknown-project": ("nosuch", "new", {"alg": "ES256", "pem": make_key("ES256").public_pem},
                            404, "unknown_project"),
        "oversized-pem": ("shop", "new", {"alg": "RS256", "pem": big}, 413, "payload_too_large"),
        "oversized-secret": ("shop", "new", {"alg": "HS256", "secret": "s" * (70 * 1024)}, 413,
                             "payload_too_large"),
    }


BAD_PUT_CASES = [
    "malformed-pem", "garbage-pem", "rsa-pem-for-es256", "pem-for-hs256", "secret-for-rs256",
    "malformed-pem-over-stored-kid", "unknown-alg", "alg-none", "es512-unsupported", "no-alg",
    "short-hs-secret", "short-hs-secret-over-stored-kid", "secret-and-pem", "no-material",
    "jwk-bad-coordinates", "jwk-rsa-without-alg", "jwk-kid-differs-from-path", "jwk-alg-mismatch",
    "jwks-document-as-body", "not-json", "bad-kid", "unknown-project", "oversized-pem",
    "oversized-secret",
]


@pytest.mark.parametrize("case", BAD_PUT_CASES)
def test_bad_key_put_is_refused_and_nothing_is_lost(admin, case):
    project, kid, body, status, error = _bad_puts(admin)[case]
    r = put_key(admin["server"], project, kid, body)
    assert_status(r, status, error)
    _stored_keys_still_work(admin)
    if kid == "new":
        # Nothing was stored under the new kid either.
        run(refused_401(admin["server"], "shop", make_key("ES256").token("kim", kid="new")))


def test_exactly_64_kib_is_not_413_and_just_over_is(admin):
    """The limit is 64 KiB of key body: a body of 65,536 bytes is read (and refused for what
    it is, 400), one of 65,537 bytes is 413."""
    server = admin["server"]
    base = json.dumps({"alg": "RS256", "pem": ""}).encode()
    pad = 64 * 1024 - len(base)
    at_limit = json.dumps({"alg": "RS256", "pem": "A" * pad}).encode()
    assert len(at_limit) == 64 * 1024
    assert_status(put_key(server, "shop", "new", at_limit), 400, "bad_request")
    over = json.dumps({"alg": "RS256", "pem": "A" * (pad + 1)}).encode()
    assert_status(put_key(server, "shop", "new", over), 413, "payload_too_large")
    _stored_keys_still_work(admin)


def test_delete_unknown_kid_or_project_is_404(admin):
    server = admin["server"]
    assert_status(delete_key(server, "shop", "nosuchkid"), 404, "not_found")
    assert_status(delete_key(server, "nosuch", "k1"), 404, "unknown_project")
    assert_status(delete_key(server, "nosuch", "k1", disconnect=True), 404, "unknown_project")
    _stored_keys_still_work(admin)


def _bad_projects(admin):
    es_pem = make_key("ES256").public_pem
    big = "-----BEGIN PUBLIC KEY-----\n" + "A" * (70 * 1024) + "\n-----END PUBLIC KEY-----\n"
    return {
        "exists": ({"id": "shop", "keys": []}, 409, "conflict"),
        "bad-id": ({"id": "Not Valid!", "keys": []}, 400, "bad_request"),
        "no-id": ({"keys": []}, 400, "bad_request"),
        "unknown-field": ({"id": "p1", "no_such_setting": 1}, 400, "bad_request"),
        "malformed-pem": ({"id": "p2", "keys": [{"kid": "a", "alg": "ES256", "pem": BAD_PEM}]},
                          400, "bad_request"),
        "unknown-alg": ({"id": "p3", "keys": [{"kid": "a", "alg": "XX1", "pem": es_pem}]}, 400,
                        "bad_request"),
        "short-secret": ({"id": "p4", "keys": [{"kid": "a", "alg": "HS256", "secret": "short"}]},
                         400, "bad_request"),
        "jwks-without-kid": (
            {"id": "p5", "jwks": json.dumps({"keys": [make_key("EdDSA").jwk(None)]})},
            400, "bad_request",
        ),
        "file-path": ({"id": "p6", "keys": [{"kid": "a", "alg": "ES256", "pem_file": "/etc/passwd"}]},
                      400, "bad_request"),
        "duplicate-kid": (
            {"id": "p7", "keys": [{"kid": "a", "alg": "ES256", "pem": es_pem}] * 2}, 400,
            "bad_request",
        ),
        "oversized-key": ({"id": "p8", "keys": [{"kid": "a", "alg": "RS256", "pem": big}]}, 413,
                          "payload_too_large"),
        "not-json": (b"{", 400, "bad_request"),
    }


BAD_PROJECT_CASES = [
    "exists", "bad-id", "no-id", "unknown-field", "malformed-pem", "unknown-alg", "short-secret",
    "jwks-without-kid", "file-path", "duplicate-kid", "oversized-key", "not-json",
]


@pytest.mark.parametrize("case", BAD_PROJECT_CASES)
def test_bad_project_create_is_refused(admin, case):
    body, status, error = _bad_projects(admin)[case]
    r = create_project(admin["server"], body)
    assert_status(r, status, error)
    _stored_keys_still_work(admin)
    pid = body.get("id") if isinstance(body, dict) else None
    if pid and pid != "shop" and re.fullmatch(r"[a-z0-9_-]{1,64}", pid):
        # The refused project does not exist: a key PUT for it is 404.
        r = put_key(admin["server"], pid, "x", make_key("ES256").spec())
        assert_status(r, 404, "unknown_project")


def test_created_project_works_and_is_isolated(admin):
    server = admin["server"]
    key = make_key("PS256")
    r = create_project(server, {"id": "made", "keys": [{"kid": "p", **key.spec()}]})
    assert r.status == 201 and r.json() == {"id": "made"}, (r.status, r.body)

    async def go():
        ws, _ = await connect_ok(server, "made", key.token("lee", kid="p"), "lee")
        await ws.close()
        await refused_401(server, "shop", key.token("lee", kid="p"))
        # shop's key does not open the new project.
        await refused_401(server, "made", admin["keys"]["k1"].token("lee", kid="k1"))

    run(go(), timeout=20)


def test_check_config_names_a_jwks_entry_without_kid(tmp_path):
    """`herald check-config` on a project whose inline JWKS has an entry without `kid` exits
    non-zero and names the project, the JWKS and the missing kid; the same for `jwks_file`."""
    jwk = make_key("ES256").jwk(None, with_alg=False)
    good = make_key("EdDSA").jwk("fine")
    inline = server_toml(
        project_toml("nokidproj", jwks=json.dumps({"keys": [good, jwk]}),
                     keys=make_key("HS256").config_toml("k1"))
    )
    jwks_file = tmp_path / "keys.jwks.json"
    jwks_file.write_text(json.dumps({"keys": [jwk]}))
    by_file = server_toml(project_toml("nokidfile", jwks_file=str(jwks_file)))
    for name, text, project in (("inline", inline, "nokidproj"), ("file", by_file, "nokidfile")):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(text)
        p = subprocess.run(
            [str(herald_bin()), "check-config", "--config", str(cfg)],
            capture_output=True, text=True, timeout=20,
        )
        assert p.returncode != 0, (name, p.returncode, p.stdout, p.stderr)
        err = p.stderr
        assert project in err and "jwks" in err.lower() and "kid" in err, (name, err)
        assert "entry 1" in err if name == "inline" else "entry 0" in err, (name, err)
    # Control: the same file with kids passes.
    ok = tmp_path / "ok.toml"
    ok.write_text(server_toml(project_toml("fine", jwks=json.dumps({"keys": [good]}))))
    p = subprocess.run([str(herald_bin()), "check-config", "--config", str(ok)],
                       capture_output=True, text=True, timeout=20)
    assert p.returncode == 0, (p.stdout, p.stderr)


SHORT_HMAC = b"8bytes!!"


@pytest.mark.parametrize("form", ["bare-jwk", "alg-and-jwk", "empty-k", "project-jwks"])
def test_short_oct_jwk_is_refused_in_every_form(admin, form):
    """An `oct` JWK under the 16-byte HMAC minimum is refused like a short secret, the answer
    names the kid, and a token signed with it opens nothing."""
    server = admin["server"]
    oct_jwk = {"kty": "oct", "alg": "HS256", "k": b64url(SHORT_HMAC)}
    if form == "project-jwks":
        r = create_project(
            server, {"id": "octproj", "jwks": json.dumps({"keys": [{**oct_jwk, "kid": "short"}]})}
        )
        project = "octproj"
    else:
        body = {
            "bare-jwk": oct_jwk,
            "alg-and-jwk": {"alg": "HS256", "jwk": {"kty": "oct", "k": b64url(SHORT_HMAC)}},
            "empty-k": {"kty": "oct", "alg": "HS256", "k": ""},
        }[form]
        r = put_key(server, "shop", "short", body)
        project = "shop"
    assert_status(r, 400, "bad_request")
    message = r.json()["message"]
    assert "`short`" in message and "at least 16 bytes" in message, message
    secret = b"" if form == "empty-k" else SHORT_HMAC
    token = hmac_token(secret, "kim", kid="short")
    if form == "project-jwks":
        # The project was not created at all.
        run(expect_refusal(server, project, token, 404, "unknown_project"), timeout=20)
    else:
        run(refused_401(server, project, token), timeout=20)
    _stored_keys_still_work(admin)


def test_check_config_refuses_a_short_oct_jwk_and_short_api_keys(tmp_path):
    """The same minimum from the config: an inline JWKS with a short `oct` key, and API and
    admin keys under 16 bytes, each named."""
    k1 = make_key("HS256").config_toml("k1")
    short_jwks = json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "kid": "tiny",
                                       "k": b64url(SHORT_HMAC)}]})
    cases = {
        "jwks": (server_toml(project_toml("octcfg", jwks=short_jwks)), "`tiny`"),
        "api-key": (server_toml(project_toml("shortapi", api_key="fifteen-bytes!!", keys=k1)),
                    "projects[0].api_key"),
        "admin-key": (server_toml(project_toml("p", keys=k1)).replace(ADMIN_KEY, "short-admin"),
                      "api.admin_key"),
    }
    for name, (text, named) in cases.items():
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(text)
        p = subprocess.run([str(herald_bin()), "check-config", "--config", str(cfg)],
                           capture_output=True, text=True, timeout=20)
        assert p.returncode == 1, (name, p.returncode, p.stdout, p.stderr)
        assert named in p.stderr and "at least 16 bytes" in p.stderr, (name, p.stderr)


def test_created_project_with_short_api_key_is_refused(admin):
    r = create_project(admin["server"], {"id": "shortkey", "api_key": "fifteen-bytes!!"})
    assert_status(r, 400, "bad_request")
    assert "api_key" in r.json()["message"], r.body


# --------------------------------------------------------------------------------------------
# Handshake gates of a project
# --------------------------------------------------------------------------------------------

ORIGIN = "https://app.example.com"


@pytest.fixture(scope="module")
def gates(tmp_path_factory):
    key = make_key("ES256")
    config = server_toml(
        project_toml("off", enabled=False, keys=key.config_toml("k"))
        + project_toml("web", allowed_origins=[ORIGIN, "http://localhost:3000"],
                       keys=key.config_toml("k"))
        + project_toml("capped", max_connections=2, keys=key.config_toml("k"))
        + project_toml("open", keys=key.config_toml("k"))
    )
    servers = Servers(tmp_path_factory.mktemp("gates"))
    server = servers.start(config=config)
    yield {"server": server, "key": key}
    servers.teardown()


def test_disabled_project_is_403(gates):
    server, key = gates["server"], gates["key"]
    run(expect_refusal(server, "off", key.token("u", kid="k"), 403, "forbidden"), timeout=20)


def test_origin_not_allowed_is_403(gates):
    server, key = gates["server"], gates["key"]

    async def go():
        for origin in ("https://evil.example.com", "https://app.example.com:8443",
                       "http://app.example.com"):
            try:
                ws = await connect_ok(server, "web", key.token("u", kid="k"), "u", origin=origin)
            except InvalidStatus as e:
                assert e.response.status_code == 403, (origin, e.response.status_code)
                body = json.loads(bytes(e.response.body))
                assert body["error"] == "forbidden" and set(body) == {"error", "message"}, body
            else:
                await ws[0].close()
                raise AssertionError(f"Origin {origin} was accepted")
        for origin in (ORIGIN, "http://localhost:3000"):
            ws, _ = await connect_ok(server, "web", key.token("u", kid="k"), "u", origin=origin)
            await ws.close()
        # A project without allowed_origins takes any Origin.
        ws, _ = await connect_ok(server, "open", key.token("u", kid="k"), "u",
                                 origin="https://evil.example.com")
        await ws.close()

    run(go(), timeout=20)


def test_project_connection_cap_is_503_with_retry_after(gates):
    server, key = gates["server"], gates["key"]

    async def go():
        a, _ = await connect_ok(server, "capped", key.token("u1", kid="k"), "u1")
        b, _ = await connect_ok(server, "capped", key.token("u2", kid="k"), "u2")
        try:
            r = await expect_refusal(server, "capped", key.token("u3", kid="k"), 503, "at_capacity")
            assert r.headers.get("Retry-After", "").isdigit(), dict(r.headers)
            # Other projects are not capped by it.
            ws, _ = await connect_ok(server, "open", key.token("u3", kid="k"), "u3")
            await ws.close()
            # A freed slot is usable again (the count drops once the close completes).
            await a.close()
            deadline = asyncio.get_running_loop().time() + 5
            while True:
                try:
                    c, _ = await connect_ok(server, "capped", key.token("u3", kid="k"), "u3")
                    break
                except InvalidStatus:
                    if asyncio.get_running_loop().time() > deadline:
                        raise
                    await asyncio.sleep(0.1)
            await expect_refusal(server, "capped", key.token("u4", kid="k"), 503, "at_capacity")
            await c.close()
        finally:
            await close_all([a, b])

    run(go(), timeout=20)
