"""Upgrade, token transports, the welcome frame and refusals before the upgrade."""

import asyncio

import pytest

from herald_client import (
    HEARTBEAT_MS,
    PROJECTS,
    assert_error_body,
    expect_refusal,
    mint,
    now,
    open_ws,
    plain_get,
    recv_json,
    run,
)

WWW_AUTH = 'Bearer error="invalid_token"'


@pytest.mark.parametrize("via", ["header", "query", "subprotocol"])
def test_token_transport_and_exact_welcome(server, via):
    async def go():
        exp = now() + 3600
        token = mint("alice", exp=exp)
        ws = await open_ws(server, "shop", token, via=via)
        try:
            raw, welcome = await recv_json(ws)
            assert set(welcome) == {"type", "conn", "project", "user", "exp", "heartbeat"}, raw
            assert welcome["type"] == "welcome"
            assert welcome["project"] == "shop"
            assert welcome["user"] == "alice"
            assert welcome["exp"] == exp
            assert welcome["heartbeat"] == HEARTBEAT_MS // 1000 == 25
            assert isinstance(welcome["conn"], str) and welcome["conn"], welcome
            headers = ws.response.headers
            if via == "subprotocol":
                assert ws.subprotocol == "herald.v1"
                assert headers.get_all("Sec-WebSocket-Protocol") == ["herald.v1"]
            else:
                assert ws.subprotocol is None
                assert "Sec-WebSocket-Protocol" not in headers
            for name, value in headers.raw_items():
                assert token not in value, f"response header {name} carries the token"
            # The token's signature alone must not leak either.
            sig = token.rsplit(".", 1)[1]
            assert all(sig not in v for _, v in headers.raw_items())
        finally:
            await ws.close()

    run(go())


def test_header_token_with_offered_subprotocol_gets_herald_v1(server):
    async def go():
        ws = await open_ws(server, "shop", mint("alice"), subprotocols=["herald.v1"])
        try:
            assert ws.subprotocol == "herald.v1"
            _, welcome = await recv_json(ws)
            assert welcome["type"] == "welcome" and welcome["user"] == "alice"
        finally:
            await ws.close()

    run(go())


def test_connection_ids_are_distinct(server):
    async def go():
        conns = [await open_ws(server, "shop", mint("alice")) for _ in range(6)]
        try:
            ids = [(await recv_json(ws))[1]["conn"] for ws in conns]
            assert len(set(ids)) == 6, ids
        finally:
            await asyncio.gather(*(ws.close() for ws in conns))

    run(go())


def _assert_unauthorized(response):
    assert response.headers.get("WWW-Authenticate") == WWW_AUTH, dict(response.headers.raw_items())


def test_missing_token_is_401(server):
    r = run(expect_refusal(server, "shop", None, 401, "unauthorized"))
    _assert_unauthorized(r)


@pytest.mark.parametrize("via", ["header", "query", "subprotocol"])
def test_bad_signature_is_401(server, via):
    token = mint("alice", secret="not-the-shop-secret-0123456789")
    r = run(expect_refusal(server, "shop", token, 401, "unauthorized", via=via))
    _assert_unauthorized(r)


def test_expired_token_is_401(server):
    # Far beyond the default 30 s leeway.
    r = run(expect_refusal(server, "shop", mint("alice", exp=now() - 3600), 401, "unauthorized"))
    _assert_unauthorized(r)


def test_malformed_token_is_401(server):
    r = run(expect_refusal(server, "shop", "not.a.jwt", 401, "unauthorized"))
    _assert_unauthorized(r)


def test_token_without_sub_is_401(server):
    r = run(expect_refusal(server, "shop", mint(None), 401, "unauthorized"))
    _assert_unauthorized(r)


def test_token_without_exp_is_401_by_default(server):
    r = run(expect_refusal(server, "shop", mint("alice", exp=None), 401, "unauthorized"))
    _assert_unauthorized(r)


def test_token_of_another_project_is_401(server):
    # Signed with shop's secret, presented to blog (same kid, different secret).
    r = run(expect_refusal(server, "blog", mint("alice", "shop"), 401, "unauthorized"))
    _assert_unauthorized(r)


def test_unknown_project_is_404(server):
    run(expect_refusal(server, "nosuchproject", mint("alice"), 404, "unknown_project"))


def test_plain_get_without_upgrade_is_400(server):
    r = plain_get(
        server.listen, "/ws/shop", {"Authorization": f"Bearer {mint('alice')}"}
    )
    assert r.status == 400, (r.status, r.body)
    assert_error_body(r.body, "bad_request")


def test_each_project_accepts_its_own_tokens(server):
    async def go():
        for project in PROJECTS:
            ws = await open_ws(server, project, mint("carol", project))
            try:
                _, welcome = await recv_json(ws)
                assert welcome["project"] == project and welcome["user"] == "carol", welcome
            finally:
                await ws.close()

    run(go())
