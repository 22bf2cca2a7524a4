"""POST /api/v1/projects/{project}/console-token (the console's live tail) and the console's
files at /console: what a minted token may do (one topic, short-lived, `sub`
herald-console), who may mint one, the refusals, and the files' headers and weight."""

from __future__ import annotations

import json

import jwt

from herald_client import (
    ADMIN_KEY,
    PROJECTS,
    apublish,
    assert_delivery,
    assert_error_body,
    close_all,
    config_toml,
    expect_close,
    http_request,
    now,
    open_ws,
    plain_get,
    recv_json,
    request,
    run,
)
from keytools import make_key, project_toml

SHOP_KEY = PROJECTS["shop"]["api_key"]


def console_token(server, project: str, body, key: str = ADMIN_KEY):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return http_request(
        "POST",
        f"{server.api_url}/api/v1/projects/{project}/console-token",
        data,
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )


def test_token_names_the_console_one_topic_and_a_short_life(server):
    for key in (ADMIN_KEY, SHOP_KEY):
        r = console_token(server, "shop", {"topic": "news"}, key)
        assert r.status == 200, r.body
        # The answer holds a client token: no cache may keep it.
        assert r.headers["Cache-Control"] == "no-store", r.headers
        grant = r.json()
        assert set(grant) == {"token", "sub", "topic", "exp", "path", "client_port"}, grant
        claims = jwt.decode(grant["token"], PROJECTS["shop"]["secret"], algorithms=["HS256"])
        assert claims["sub"] == "herald-console" == grant["sub"]
        assert claims["topics"] == ["news"] and grant["topic"] == "news"
        assert claims["exp"] == grant["exp"]
        assert 0 < claims["exp"] - claims["iat"] <= 300, claims
        assert abs(claims["iat"] - now()) <= 5, claims
        assert jwt.get_unverified_header(grant["token"])["kid"] == "k1"
        assert grant["path"] == "/ws/shop"
        assert grant["client_port"] == int(server.listen.rsplit(":", 1)[1])


def test_token_subscribes_to_its_topic_only(server):
    async def scenario():
        grant = console_token(server, "shop", {"topic": "news"}).json()
        ws = await open_ws(server, "shop", grant["token"], via="subprotocol")
        _, welcome = await recv_json(ws)
        assert welcome["type"] == "welcome" and welcome["user"] == "herald-console", welcome
        assert await request(ws, {"op": "subscribe", "topic": "news", "id": 1}) == {"type": "ack", "id": 1}
        refused = await request(ws, {"op": "subscribe", "topic": "orders", "id": 2})
        assert refused["type"] == "error" and refused["id"] == 2 and refused["code"] == "forbidden", refused
        mid = await apublish(server, {"project": "shop", "topic": "news", "data": {"n": 1}})
        _, msg = await recv_json(ws)
        assert_delivery(msg, "news", {"n": 1}, mid)
        await close_all([ws])

    run(scenario())


def test_token_refusals(servers):
    edge = make_key("ES256")
    extra = project_toml("edge", edge.config_toml("e1"), api_key="edge-api-key-0123456789")
    extra += project_toml(
        "off", f'\n[[projects.keys]]\nkid = "h"\nalg = "HS256"\nsecret = "{"x" * 32}"\n', enabled=False
    )
    server = servers.start(config=config_toml(extra=extra))
    cases = [
        # (project, body, key, status, error, message)
        ("blog", {"topic": "news"}, SHOP_KEY, 403, "forbidden", "this API key does not act on project `blog`"),
        ("nope", {"topic": "news"}, SHOP_KEY, 403, "forbidden", "this API key does not act on project `nope`"),
        ("nope", {"topic": "news"}, ADMIN_KEY, 404, "unknown_project", "no project `nope`"),
        ("shop", {"topic": "news"}, "wrong", 401, "unauthorized", "unknown API key"),
        ("shop", {"topic": "news*"}, ADMIN_KEY, 400, "bad_request",
         "topic `news*`: a console token names one topic, without `*`"),
        ("shop", {"topic": "user.alice"}, ADMIN_KEY, 400, "bad_request",
         "topic `user.alice`: user. and device. topics cannot be subscribed to, so not tailed"),
        ("shop", {"topic": "$x"}, ADMIN_KEY, 400, "bad_request", "topic `$x`: topics may not start with `$`"),
        ("shop", {"topic": "news", "sub": "alice"}, ADMIN_KEY, 400, "bad_request", None),
        ("shop", b"{", ADMIN_KEY, 400, "bad_request", None),
        ("off", {"topic": "news"}, ADMIN_KEY, 409, "project_disabled",
         "project `off` is disabled: its handshakes are refused"),
        ("edge", {"topic": "news"}, "edge-api-key-0123456789", 409, "no_signing_key",
         "project `edge` has no HMAC key, so herald holds no secret to sign a token with (its keys, "
         "if any, are public: RSA, EC, Ed25519 or JWKS); add an HMAC key to tail it from the console"),
    ]
    for project, body, key, status, error, message in cases:
        r = console_token(server, project, body, key)
        assert r.status == status, (project, body, r.status, r.body)
        err = assert_error_body(r.body, error)
        if message is not None:
            assert err["message"] == message, err
    r = http_request("GET", f"{server.api_url}/api/v1/projects/shop/console-token", None,
                     {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status == 405
    assert_error_body(r.body, "method_not_allowed")


def test_token_lives_no_longer_than_the_project_allows(servers):
    """A project whose tokens may live 2 s gets a 2 s console token, closed 4001 at exp."""
    extra = project_toml(
        "brief",
        f'\n[[projects.keys]]\nkid = "h"\nalg = "HS256"\nsecret = "{"b" * 32}"\n',
        max_token_lifetime_secs=2,
        leeway_secs=0,
    )
    server = servers.start(config=config_toml(extra=extra))

    async def scenario():
        grant = console_token(server, "brief", {"topic": "news"}).json()
        claims = jwt.decode(grant["token"], "b" * 32, algorithms=["HS256"])
        assert claims["exp"] - claims["iat"] == 2, claims
        ws = await open_ws(server, "brief", grant["token"])
        _, welcome = await recv_json(ws)
        assert welcome["type"] == "welcome", welcome
        await expect_close(ws, 4001, timeout=10)

    run(scenario())


def test_console_files(server):
    total = 0
    for path, ctype in [
        ("/console", "text/html; charset=utf-8"),
        ("/console/", "text/html; charset=utf-8"),
        ("/console/console.js", "text/javascript; charset=utf-8"),
        ("/console/console.css", "text/css; charset=utf-8"),
    ]:
        r = plain_get(server.api_listen, path)
        assert r.status == 200, (path, r.status)
        assert r.headers["Content-Type"] == ctype, path
        assert r.headers["Cache-Control"] == "no-cache"
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["X-Frame-Options"] == "DENY"
        csp = r.headers["Content-Security-Policy"]
        port = server.listen.rsplit(":", 1)[1]
        assert csp == (
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
            f"connect-src 'self' ws://127.0.0.1:{port} wss://127.0.0.1:{port}; base-uri 'none'; "
            "form-action 'none'; frame-ancestors 'none'"
        ), csp
        etag = r.headers["ETag"]
        again = plain_get(server.api_listen, path, {"If-None-Match": etag})
        assert again.status == 304 and again.body == b"", (path, again.status)
        if path != "/console/":
            total += len(r.body)
    page = plain_get(server.api_listen, "/console").body
    # No inline script or style: the policy would refuse them.
    assert page.count(b"<script") == 1 and b'<script src="/console/console.js"' in page
    assert b"<style" not in page and b" style=" not in page
    print(f"console page weight: {total} bytes")
    assert total < 200 * 1024, total
    r = plain_get(server.api_listen, "/console/nope.js")
    assert r.status == 404
    assert assert_error_body(r.body, "not_found")["message"] == "no console file `nope.js`"
    r = http_request("POST", f"{server.api_url}/console", b"", {})
    assert r.status == 405
