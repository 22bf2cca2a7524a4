"""Issue 4: token expiry during a connection (close 4001) and the `refresh` op.

The project has `leeway_secs = 0`, so a connection must be closed when `exp` passes; herald's
sweep ticks at most every second with the default heartbeat, so the close comes within ~1 s
of `exp` (the tests allow a few seconds)."""

from __future__ import annotations

import asyncio
import time

import pytest

from herald_client import (
    apublish,
    assert_delivery,
    close_all,
    expect_close,
    expect_silence,
    now,
    recv_json,
    request,
    run,
)
from keytools import (
    assert_status,
    connect_ok,
    delete_key,
    make_key,
    project_toml,
    put_key,
    server_toml,
)


@pytest.fixture
def expiry(servers):
    keys = {"hs": make_key("HS256"), "es": make_key("ES256")}
    other = make_key("HS256")
    config = server_toml(
        project_toml(
            "exp",
            leeway_secs=0,
            keys=keys["hs"].config_toml("hs") + keys["es"].config_toml("es"),
        )
        + project_toml("other", leeway_secs=0, keys=other.config_toml("hs"))
    )
    return {"server": servers.start(config=config), "keys": keys, "other": other}


def test_connection_closed_4001_when_exp_passes(expiry):
    server, key = expiry["server"], expiry["keys"]["es"]

    async def go():
        exp = now() + 2
        ws, welcome = await connect_ok(server, "exp", key.token("eve", kid="es", exp=exp), "eve", exp)
        # A second connection of the same user with a long token must stay.
        long_ws, _ = await connect_ok(server, "exp", key.token("eve", kid="es"), "eve")
        try:
            before = await expect_close(ws, 4001, timeout=5.5)
            closed_at = time.time()
            assert before == [], before
            assert closed_at >= exp - 0.2, f"closed {exp - closed_at:.2f}s before exp"
            assert closed_at <= exp + 2.5, f"closed {closed_at - exp:.2f}s after exp"
            mid = await apublish(server, {"project": "exp", "topic": "user.eve", "data": 1})
            _, msg = await recv_json(long_ws)
            assert_delivery(msg, "user.eve", 1, mid)
            await expect_silence(long_ws)
        finally:
            await close_all([ws, long_ws])

    run(go(), timeout=20)


def test_refresh_keeps_the_connection_open_past_the_old_exp(expiry):
    """Refresh at ~1 s with a token expiring in 60 s (of the other key of the project): ack
    with the new exp; no close for 3 s past the old exp; a publish still arrives."""
    server, keys = expiry["server"], expiry["keys"]

    async def go():
        old_exp = now() + 2
        ws, _ = await connect_ok(server, "exp", keys["hs"].token("fay", kid="hs", exp=old_exp), "fay", old_exp)
        try:
            await asyncio.sleep(1.0)
            new_exp = now() + 60
            reply = await request(
                ws, {"op": "refresh", "token": keys["es"].token("fay", kid="es", exp=new_exp), "id": 9}
            )
            assert reply == {"type": "ack", "id": 9, "exp": new_exp}, reply
            wait = old_exp + 3 - time.time()
            await expect_silence(ws, max(wait, 0.5))
            assert ws.close_code is None
            mid = await apublish(server, {"project": "exp", "topic": "all", "data": "still here"})
            _, msg = await recv_json(ws)
            assert_delivery(msg, "all", "still here", mid)
        finally:
            await ws.close()

    run(go(), timeout=20)


def test_refresh_with_a_shorter_token_closes_at_the_new_exp(expiry):
    """The latest refresh decides: refreshing a 60 s token with one expiring in 2 s closes
    the connection with 4001 at the new exp."""
    server, key = expiry["server"], expiry["keys"]["hs"]

    async def go():
        ws, _ = await connect_ok(server, "exp", key.token("gus", kid="hs", exp=now() + 60), "gus")
        try:
            new_exp = now() + 2
            reply = await request(
                ws, {"op": "refresh", "token": key.token("gus", kid="hs", exp=new_exp), "id": "r"}
            )
            assert reply == {"type": "ack", "id": "r", "exp": new_exp}, reply
            await expect_close(ws, 4001, timeout=5.5)
            assert time.time() >= new_exp - 0.2
        finally:
            await ws.close()

    run(go(), timeout=20)


def _refresh_refusals(expiry):
    keys, other = expiry["keys"], expiry["other"]
    return {
        "another-sub": keys["hs"].token("mallory", kid="hs"),
        "another-project": other.token("hal", kid="hs"),
        "expired": keys["hs"].token("hal", kid="hs", exp=now() - 5),
        "bad-signature": make_key("HS256").token("hal", kid="hs"),
        "garbage": "not.a.jwt",
    }


@pytest.mark.parametrize("case", ["another-sub", "another-project", "expired", "bad-signature", "garbage"])
def test_refresh_refused_is_forbidden_and_keeps_the_connection(expiry, case):
    """A refused refresh answers `{"type":"error","code":"forbidden"}` with the id, and the
    connection stays open with its old exp (it still gets closed 4001 then)."""
    server, keys = expiry["server"], expiry["keys"]

    async def go():
        exp = now() + 3
        ws, _ = await connect_ok(server, "exp", keys["hs"].token("hal", kid="hs", exp=exp), "hal")
        try:
            token = _refresh_refusals(expiry)[case]
            reply = await request(ws, {"op": "refresh", "token": token, "id": 5})
            assert reply.get("type") == "error" and reply.get("code") == "forbidden", reply
            assert reply.get("id") == 5, reply
            assert set(reply) == {"type", "id", "code", "message"}, reply
            pong = await request(ws, {"op": "ping", "id": 6})
            assert pong == {"type": "pong", "id": 6}, pong
            if case == "another-sub":
                # The refused refresh changed nothing: the old exp still closes it.
                await expect_close(ws, 4001, timeout=6)
        finally:
            await ws.close()

    run(go(), timeout=20)




def test_refresh_accepts_a_key_rotated_in_after_the_connection_opened(expiry):
    """Rotation: the backend registers a new key through the API and clients refresh with
    tokens of it. The refresh must verify against the project's keys as they are now."""
    server, keys = expiry["server"], expiry["keys"]
    rotated = make_key("EdDSA")

    async def go():
        ws, _ = await connect_ok(server, "exp", keys["hs"].token("ann", kid="hs"), "ann")
        try:
            r = await asyncio.to_thread(put_key, server, "exp", "rot", rotated.spec())
            assert_status(r, 204)
            # New handshakes with the new key work...
            ws2, _ = await connect_ok(server, "exp", rotated.token("ann", kid="rot"), "ann")
            await ws2.close()
            # ...and so must a refresh of a connection opened before the key existed.
            new_exp = now() + 120
            reply = await request(
                ws, {"op": "refresh", "token": rotated.token("ann", kid="rot", exp=new_exp), "id": 1}
            )
            assert reply == {"type": "ack", "id": 1, "exp": new_exp}, reply
        finally:
            await ws.close()

    run(go(), timeout=20)


def test_refresh_refuses_a_key_revoked_after_the_connection_opened(expiry):
    """A key deleted through the API (without disconnect) opens nothing new: its tokens are
    401 at the handshake, and a refresh with one must be refused too."""
    server, keys = expiry["server"], expiry["keys"]

    async def go():
        ws, _ = await connect_ok(server, "exp", keys["hs"].token("bea", kid="hs"), "bea")
        try:
            r = await asyncio.to_thread(delete_key, server, "exp", "hs")
            assert_status(r, 204)
            reply = await request(
                ws, {"op": "refresh", "token": keys["hs"].token("bea", kid="hs"), "id": 2}
            )
            assert reply.get("type") == "error" and reply.get("code") == "forbidden", reply
            # The connection itself stays (revocation without disconnect).
            pong = await request(ws, {"op": "ping", "id": 3})
            assert pong == {"type": "pong", "id": 3}, pong
        finally:
            await ws.close()

    run(go(), timeout=20)
