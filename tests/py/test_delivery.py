"""Publishing over HTTP and delivery: multicast, broadcast, unicast, project isolation."""

import asyncio
import json

from herald_client import (
    PROJECTS,
    apublish,
    assert_delivery,
    client,
    close_all,
    expect_silence,
    recv_json,
    request,
    run,
    subscribe,
)

# Odd spacing and a 1.50 that re-serialisation would turn into 1.5.
ODD_DATA = '{"b": 1,  "a":[1.50, "x"]}'


def test_subscribe_publish_receive_exact(server):
    async def go():
        ws, _ = await client(server, "alice")
        other, _ = await client(server, "bob")
        try:
            await subscribe(ws, "news", rid=1)
            data = {"title": "hello", "n": 7, "nested": {"ok": True, "list": [1, "two", None]}}
            mid = await apublish(server, {"project": "shop", "topic": "news", "data": data})
            raw, msg = await recv_json(ws)
            assert_delivery(msg, "news", data, mid)
            await expect_silence(ws)
            await expect_silence(other, 0.1)
        finally:
            await close_all([ws, other])

    run(go())


def test_data_passes_through_byte_for_byte(server):
    async def go():
        ws, _ = await client(server, "alice")
        try:
            await subscribe(ws, "news")
            body = '{"project":"shop","topic":"news","data":' + ODD_DATA + "}"
            mid = await apublish(server, body)
            raw, msg = await recv_json(ws)
            assert '"data":' + ODD_DATA in raw, raw
            assert_delivery(msg, "news", json.loads(ODD_DATA), mid)
        finally:
            await ws.close()

    run(go())


def test_scalar_and_string_data(server):
    async def go():
        ws, _ = await client(server, "alice")
        try:
            await subscribe(ws, "news")
            for data in ('"just a string"', "42", "[]", "1.50", "true", '{"k":  [ ] }'):
                body = '{"project":"shop","topic":"news","data":' + data + "}"
                mid = await apublish(server, body)
                raw, msg = await recv_json(ws)
                assert '"data":' + data in raw, raw
                assert_delivery(msg, "news", json.loads(data), mid)
        finally:
            await ws.close()

    run(go())


def test_null_data_is_delivered(server):
    # `null` is valid JSON: the publisher's data, passed through like any other value.
    async def go():
        ws, _ = await client(server, "alice")
        try:
            await subscribe(ws, "news")
            mid = await apublish(server, '{"project":"shop","topic":"news","data":null}')
            raw, msg = await recv_json(ws)
            assert '"data":null' in raw, raw
            assert_delivery(msg, "news", None, mid)
        finally:
            await ws.close()

    run(go())


def test_message_ids_are_distinct(server):
    async def go():
        ws, _ = await client(server, "alice")
        try:
            await subscribe(ws, "news")
            ids = []
            for i in range(5):
                mid = await apublish(server, {"project": "shop", "topic": "news", "data": i})
                _, msg = await recv_json(ws)
                assert_delivery(msg, "news", i, mid)
                ids.append(mid)
            assert len(set(ids)) == 5, ids
        finally:
            await ws.close()

    run(go())


def test_unsubscribe_stops_delivery(server):
    async def go():
        ws, _ = await client(server, "alice")
        try:
            await subscribe(ws, "news", rid="s")
            reply = await request(ws, {"op": "unsubscribe", "topic": "news", "id": "u"})
            assert reply == {"type": "ack", "id": "u"}, reply
            await apublish(server, {"project": "shop", "topic": "news", "data": 1})
            # Fence: a unicast published after it does arrive, and it is the only frame.
            mid = await apublish(server, {"project": "shop", "topic": "user.alice", "data": 2})
            _, msg = await recv_json(ws)
            assert_delivery(msg, "user.alice", 2, mid)
            await expect_silence(ws)
        finally:
            await ws.close()

    run(go())


def test_topics_array_delivers_once_per_subscribed_topic(server):
    async def go():
        both, _ = await client(server, "alice")
        weather, _ = await client(server, "bob")
        none, _ = await client(server, "carol")
        try:
            await subscribe(both, "news", rid=1)
            await subscribe(both, "sports", rid=2)
            await subscribe(weather, "weather", rid=1)
            body = (
                '{"project":"shop","topics":["news","sports","weather","empty"],"data":'
                + ODD_DATA
                + "}"
            )
            mid = await apublish(server, body)
            got = [await recv_json(both), await recv_json(both)]
            assert sorted(m["topic"] for _, m in got) == ["news", "sports"], got
            for raw, msg in got:
                assert '"data":' + ODD_DATA in raw, raw
                assert_delivery(msg, msg["topic"], json.loads(ODD_DATA), mid)
            raw, msg = await recv_json(weather)
            assert_delivery(msg, "weather", json.loads(ODD_DATA), mid)
            await asyncio.gather(expect_silence(both), expect_silence(weather), expect_silence(none))
        finally:
            await close_all([both, weather, none])

    run(go())


def test_seed_aliases_project_id_and_payload(server):
    async def go():
        ws, _ = await client(server, "alice")
        try:
            await subscribe(ws, "news")
            body = '{"projectId":"shop","topic":"news","payload":' + ODD_DATA + "}"
            mid = await apublish(server, body)
            raw, msg = await recv_json(ws)
            assert '"data":' + ODD_DATA in raw, raw
            assert_delivery(msg, "news", json.loads(ODD_DATA), mid)
            await expect_silence(ws)
        finally:
            await ws.close()

    run(go())


def test_project_api_key_publishes_to_its_project(server):
    async def go():
        ws, _ = await client(server, "alice")
        try:
            await subscribe(ws, "news")
            mid = await apublish(
                server,
                {"project": "shop", "topic": "news", "data": {"k": "v"}},
                key=PROJECTS["shop"]["api_key"],
            )
            _, msg = await recv_json(ws)
            assert_delivery(msg, "news", {"k": "v"}, mid)
        finally:
            await ws.close()

    run(go())


def test_broadcast_reaches_every_connection_of_the_project_only(server):
    async def go():
        shop = await asyncio.gather(*(client(server, f"user{i}", "shop") for i in range(20)))
        blog = await asyncio.gather(*(client(server, f"user{i}", "blog") for i in range(5)))
        shop = [ws for ws, _ in shop]
        blog = [ws for ws, _ in blog]
        try:
            mid = await apublish(server, '{"project":"shop","topic":"all","data":' + ODD_DATA + "}")
            got = await asyncio.gather(*(recv_json(ws) for ws in shop))
            for raw, msg in got:
                assert '"data":' + ODD_DATA in raw, raw
                assert_delivery(msg, "all", json.loads(ODD_DATA), mid)
            await asyncio.gather(*(expect_silence(ws) for ws in shop + blog))

            mid = await apublish(server, {"project": "blog", "topic": "all", "data": "b"})
            got = await asyncio.gather(*(recv_json(ws) for ws in blog))
            for _, msg in got:
                assert_delivery(msg, "all", "b", mid)
            await asyncio.gather(*(expect_silence(ws) for ws in shop + blog))
        finally:
            await close_all(shop + blog)

    run(go())


def test_unicast_reaches_exactly_the_users_connections(server):
    async def go():
        alice = [(await client(server, "alice"))[0] for _ in range(3)]
        bob = [(await client(server, "bob"))[0] for _ in range(2)]
        blog_alice, _ = await client(server, "alice", "blog")
        try:
            mid = await apublish(server, {"project": "shop", "topic": "user.alice", "data": {"to": "a"}})
            got = await asyncio.gather(*(recv_json(ws) for ws in alice))
            for _, msg in got:
                assert_delivery(msg, "user.alice", {"to": "a"}, mid)
            await asyncio.gather(*(expect_silence(ws) for ws in alice + bob + [blog_alice]))
        finally:
            await close_all(alice + bob + [blog_alice])

    run(go())


def test_device_topic_reaches_the_device_connection(server):
    async def go():
        phone, _ = await client(server, "alice", device="phone1")
        laptop, _ = await client(server, "alice", device="laptop1")
        try:
            mid = await apublish(server, {"project": "shop", "topic": "device.phone1", "data": 3})
            _, msg = await recv_json(phone)
            assert_delivery(msg, "device.phone1", 3, mid)
            await asyncio.gather(expect_silence(phone), expect_silence(laptop))
        finally:
            await close_all([phone, laptop])

    run(go())


def test_same_topic_in_two_projects_is_isolated(server):
    async def go():
        shop, _ = await client(server, "alice", "shop")
        blog, _ = await client(server, "alice", "blog")
        try:
            await subscribe(shop, "news")
            await subscribe(blog, "news")
            mid = await apublish(server, {"project": "shop", "topic": "news", "data": "s"})
            _, msg = await recv_json(shop)
            assert_delivery(msg, "news", "s", mid)
            await asyncio.gather(expect_silence(shop), expect_silence(blog))

            mid = await apublish(
                server,
                {"project": "blog", "topic": "news", "data": "b"},
                key=PROJECTS["blog"]["api_key"],
            )
            _, msg = await recv_json(blog)
            assert_delivery(msg, "news", "b", mid)
            await asyncio.gather(expect_silence(shop), expect_silence(blog))
        finally:
            await close_all([shop, blog])

    run(go())
