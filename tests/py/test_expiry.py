"""Token expiry during a connection (close 4001) and the `refresh` op.

The project has `leeway_secs = 0`, so a connection must be closed when `exp` passes; herald's
sweep ticks at most every second with the default heartbeat, so the close comes within ~1 s
of `exp` (the tests allow a few seconds)."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from herald_client import (
    apublish,
    assert_delivery,
    close_all,
    expect_close,
    expect_refusal,
    expect_silence,
    now,
    recv_json,
    request,
    run,
    subscribe,
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
        # From the start of a second: `exp` counts whole seconds, so the old token has the
        # full 2 s and the refresh at ~1 s comes well before it runs out.
        await asyncio.sleep(1.02 - time.time() % 1)
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


# --------------------------------------------------------------------------------------------
# Token lifetime bound, refresh rate, and what a refresh changes
# --------------------------------------------------------------------------------------------

DAY = 24 * 3600


def test_token_lifetime_is_bounded(servers):
    """`exp` may be at most `max_token_lifetime_secs` (default 30 days) plus the leeway
    ahead: beyond it the handshake is 401 and a refresh is refused, so no connection is kept
    for ever (`exp` up to 2^63 used to be accepted)."""
    key = make_key("HS256")
    server = servers.start(
        config=server_toml(
            project_toml("dflt", keys=key.config_toml("hs"))
            + project_toml("short", max_token_lifetime_secs=60, leeway_secs=0, keys=key.config_toml("hs"))
        )
    )

    async def go():
        ws, _ = await connect_ok(server, "dflt", key.token("kim", kid="hs", exp=now() + 29 * DAY), "kim")
        await ws.close()
        for exp in (now() + 31 * DAY, 2**63 - 1):
            r = await expect_refusal(server, "dflt", key.token("kim", kid="hs", exp=exp), 401, "unauthorized")
            assert json.loads(bytes(r.body))["message"] == (
                "token lifetime too long: exp is more than 2592000 s ahead"
            ), bytes(r.body)
        r = await expect_refusal(server, "short", key.token("kim", kid="hs", exp=now() + 120), 401, "unauthorized")
        assert json.loads(bytes(r.body))["message"] == "token lifetime too long: exp is more than 60 s ahead"
        ws, _ = await connect_ok(server, "short", key.token("kim", kid="hs", exp=now() + 50), "kim")
        try:
            reply = await request(
                ws, {"op": "refresh", "token": key.token("kim", kid="hs", exp=now() + 3600), "id": 1}
            )
            assert reply == {
                "type": "error",
                "id": 1,
                "code": "forbidden",
                "message": "refresh refused: token lifetime too long: exp is more than 60 s ahead",
            }, reply
        finally:
            await ws.close()

    run(go(), timeout=20)


def test_refresh_has_its_own_rate(servers):
    """`limits.refreshes_per_conn_per_min` (here 2, burst 2): the third refresh in a row is
    answered `rate_limited` and changes nothing; other ops are not affected."""
    key = make_key("HS256")
    limits = "\n[limits]\nrefreshes_per_conn_per_min = 2\nrefresh_burst_per_conn = 2\n"
    server = servers.start(config=server_toml(limits + project_toml("exp", leeway_secs=0, keys=key.config_toml("hs"))))

    async def go():
        exp = now() + 3
        ws, _ = await connect_ok(server, "exp", key.token("lou", kid="hs", exp=exp), "lou", exp)
        try:
            for i in (1, 2):
                reply = await request(ws, {"op": "refresh", "token": key.token("lou", kid="hs", exp=exp), "id": i})
                assert reply == {"type": "ack", "id": i, "exp": exp}, reply
            later = now() + 600
            reply = await request(ws, {"op": "refresh", "token": key.token("lou", kid="hs", exp=later), "id": 3})
            assert reply.get("code") == "rate_limited", reply
            assert reply in [
                {
                    "type": "error",
                    "id": 3,
                    "code": "rate_limited",
                    "message": f"at most 2 refreshes per minute (burst 2); retry in {s} s",
                }
                for s in (30, 29)
            ], reply
            pong = await request(ws, {"op": "ping", "id": 4})
            assert pong == {"type": "pong", "id": 4}, pong
            # The refused refresh did not extend the token: the old exp still closes it.
            await expect_close(ws, 4001, timeout=6)
        finally:
            await ws.close()

    run(go(), timeout=20)


def test_refresh_applies_the_new_topics_and_device(servers):
    """A refresh to a token with narrower `topics` drops the explicit subscriptions it no
    longer allows, one `unsubscribed` message each (in subscription order) before the ack;
    they get no more publishes and cannot be subscribed again. A changed `device` moves the
    implicit `device.` subscription; a token without `topics` allows any topic again."""
    key = make_key("HS256")
    server = servers.start(config=server_toml(project_toml("exp", keys=key.config_toml("hs"))))

    async def publish_each(topics):
        return {t: await apublish(server, {"project": "exp", "topic": t, "data": t}) for t in topics}

    async def go():
        tok = key.token("max", kid="hs", topics=["news.*", "chat"], device="d1")
        ws, _ = await connect_ok(server, "exp", tok, "max")
        try:
            for i, t in enumerate(["news.eu", "chat", "news.us"]):
                await subscribe(ws, t, rid=i)
            exp = now() + 900
            narrower = key.token("max", kid="hs", exp=exp, topics=["news.eu", "sport"], device="d2")
            await ws.send(json.dumps({"op": "refresh", "token": narrower, "id": "r"}))
            frames = [(await recv_json(ws))[1] for _ in range(3)]
            assert frames == [
                {"type": "unsubscribed", "topic": "chat", "reason": "not_allowed"},
                {"type": "unsubscribed", "topic": "news.us", "reason": "not_allowed"},
                {"type": "ack", "id": "r", "exp": exp},
            ], frames
            reply = await request(ws, {"op": "subscribe", "topic": "chat", "id": 5})
            assert reply == {
                "type": "error",
                "id": 5,
                "code": "forbidden",
                "message": "the token does not allow `chat`",
            }, reply
            reply = await request(ws, {"op": "subscribe", "topic": "news.us", "id": 6})
            assert reply.get("code") == "forbidden", reply
            await subscribe(ws, "sport", rid=7)
            # Dropped topics and the old device first, then what must still arrive.
            await publish_each(["chat", "news.us", "device.d1"])
            ids = await publish_each(["news.eu", "sport", "device.d2", "user.max"])
            for t, mid in ids.items():
                _, msg = await recv_json(ws)
                assert_delivery(msg, t, t, mid)
            await expect_silence(ws)
            # No `topics` claim: any topic again; no `device`: no device topic.
            reply = await request(ws, {"op": "refresh", "token": key.token("max", kid="hs", exp=exp), "id": 8})
            assert reply == {"type": "ack", "id": 8, "exp": exp}, reply
            await subscribe(ws, "chat", rid=9)
            await publish_each(["device.d2"])
            ids = await publish_each(["chat", "news.eu"])
            for t, mid in ids.items():
                _, msg = await recv_json(ws)
                assert_delivery(msg, t, t, mid)
            await expect_silence(ws)
        finally:
            await ws.close()

    run(go(), timeout=30)
