"""Client ops, error replies that keep the connection open, and protocol closes."""

import pytest

from herald_client import (
    apublish,
    assert_delivery,
    client,
    expect_close,
    expect_silence,
    recv_json,
    request,
    run,
    subscribe,
)


def _assert_error(reply, rid, code):
    assert set(reply) == {"type", "id", "code", "message"}, reply
    assert reply["type"] == "error", reply
    assert reply["id"] == rid, reply
    assert reply["code"] == code, reply
    assert isinstance(reply["message"], str), reply


async def _still_open(ws):
    reply = await request(ws, {"op": "ping", "id": "alive"})
    assert reply == {"type": "pong", "id": "alive"}, reply


@pytest.mark.parametrize("rid", ["x", 7, 1.5])
def test_ping_op_echoes_id(server, rid):
    async def go():
        ws, _ = await client(server)
        try:
            reply = await request(ws, {"op": "ping", "id": rid})
            assert reply == {"type": "pong", "id": rid}, reply
        finally:
            await ws.close()

    run(go())


@pytest.mark.parametrize("topic", ["user.x", "user.alice", "device.x"])
def test_subscribe_to_reserved_topic_is_forbidden(server, topic):
    async def go():
        ws, _ = await client(server, "alice")
        try:
            reply = await request(ws, {"op": "subscribe", "topic": topic, "id": 3})
            _assert_error(reply, 3, "forbidden")
            await _still_open(ws)
            # user.x was not subscribed: a unicast to x does not arrive.
            await apublish(server, {"project": "shop", "topic": "user.x", "data": 1})
            await expect_silence(ws)
        finally:
            await ws.close()

    run(go())


def test_topics_claim_restricts_subscriptions(server):
    async def go():
        ws, _ = await client(server, "alice", topics=["news", "chat.*"])
        try:
            await subscribe(ws, "chat.room1", rid=1)
            await subscribe(ws, "news", rid=2)
            reply = await request(ws, {"op": "subscribe", "topic": "sports", "id": 3})
            _assert_error(reply, 3, "forbidden")
            reply = await request(ws, {"op": "subscribe", "topic": "newsroom", "id": 4})
            _assert_error(reply, 4, "forbidden")
            await _still_open(ws)
            # The allowed subscriptions work, the refused one delivers nothing.
            await apublish(server, {"project": "shop", "topic": "sports", "data": 0})
            mid = await apublish(server, {"project": "shop", "topic": "chat.room1", "data": 1})
            _, msg = await recv_json(ws)
            assert_delivery(msg, "chat.room1", 1, mid)
            await expect_silence(ws)
        finally:
            await ws.close()

    run(go())


def test_unknown_op_is_bad_request(server):
    async def go():
        ws, _ = await client(server)
        try:
            reply = await request(ws, {"op": "dance", "id": "d"})
            _assert_error(reply, "d", "bad_request")
            await _still_open(ws)
        finally:
            await ws.close()

    run(go())


def test_invalid_json_text_frame_closes_1007(server):
    async def go():
        ws, _ = await client(server)
        await ws.send('{"op":"ping",')
        await expect_close(ws, 1007)

    run(go())


def test_binary_frame_closes_1003(server):
    async def go():
        ws, _ = await client(server)
        await ws.send(b'{"op":"ping","id":1}')
        await expect_close(ws, 1003)

    run(go())
