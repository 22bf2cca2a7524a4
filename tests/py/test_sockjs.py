"""SockJS's WebSocket transport, spoken by a raw client as sockjs-client speaks it: `/info`,
the session URL `<base>/<server>/<session>/websocket`, `o`, `a[...]`, `h`, `c[...]`, around
STOMP (the default) or herald.v1 (`?protocol=herald.v1`). docs/stomp.md is the contract."""

from __future__ import annotations

import asyncio
import http.client
import json

from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from herald_client import (
    RECV_TIMEOUT,
    apublish,
    assert_error_body,
    client,
    close_all,
    config_toml,
    expect_close,
    mint,
    plain_get,
    run,
    subscribe,
)
from test_stomp import frame, parse, recv_frame, stomp_ws


def sockjs_url(server, base: str, query: str = "") -> str:
    """The session URL sockjs-client builds: `<base>/<server>/<session>/websocket?<query>`."""
    q = f"?{query}" if query else ""
    return f"{server.ws_url}{base}/123/abcdefgh/websocket{q}"


async def sockjs_open(server, base: str = "/sockjs/shop", query: str = ""):
    """Opens a SockJS session as sockjs-client does (no subprotocol) and reads its `o`."""
    ws = await connect(
        sockjs_url(server, base, query), open_timeout=10, close_timeout=3, ping_interval=None
    )
    assert await asyncio.wait_for(ws.recv(), RECV_TIMEOUT) == "o"
    return ws


async def recv_sockjs(ws, timeout: float = RECV_TIMEOUT) -> str:
    """The next SockJS frame that is not a heart-beat `h`."""
    while True:
        raw = await asyncio.wait_for(ws.recv(), timeout)
        assert isinstance(raw, str), raw
        if raw != "h":
            return raw


async def recv_messages(ws, n: int, timeout: float = RECV_TIMEOUT) -> list[str]:
    """The next `n` messages, from as many `a[...]` frames as carry them."""
    out: list[str] = []
    while len(out) < n:
        raw = await recv_sockjs(ws, timeout)
        assert raw.startswith("a["), raw
        out.extend(json.loads(raw[1:]))
    assert len(out) == n, out
    return out


async def send_messages(ws, *messages: str) -> None:
    """Sends messages as sockjs-client does: one JSON array of strings."""
    await ws.send(json.dumps(list(messages)))


async def stomp_over_sockjs(server, token: str, base: str = "/sockjs/shop", query: str = ""):
    ws = await sockjs_open(server, base, query)
    await send_messages(ws, frame("CONNECT", {"accept-version": "1.2", "Authorization": f"Bearer {token}"}))
    (connected,) = await recv_messages(ws, 1)
    assert parse(connected)[0] == "CONNECTED", connected
    return ws


def request(server, method: str, path: str, headers: dict | None = None):
    host, port = server.listen.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request(method, path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.headers, r.read()
    finally:
        c.close()


def test_info_answers_what_sockjs_client_needs_to_choose_websocket(server):
    origin = {"Origin": "http://page.example:8080"}
    for path in ["/sockjs/shop/info?t=1", f"/sockjs/info?token={mint('alice')}&projectId=shop"]:
        status, headers, body = request(server, "GET", path, origin)
        assert status == 200, (path, body)
        info = json.loads(body)
        assert set(info) == {"websocket", "cookie_needed", "origins", "entropy"}, info
        assert (info["websocket"], info["cookie_needed"], info["origins"]) == (True, False, ["*:*"])
        assert isinstance(info["entropy"], int)
        assert headers["Content-Type"] == "application/json; charset=UTF-8"
        assert headers["Access-Control-Allow-Origin"] == "http://page.example:8080"
        assert headers["Access-Control-Allow-Credentials"] == "true"
    status, headers, body = request(
        server,
        "OPTIONS",
        "/sockjs/shop/info",
        {**origin, "Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "x-a"},
    )
    assert (status, body) == (204, b"")
    assert headers["Access-Control-Allow-Methods"] == "OPTIONS, GET"
    assert headers["Access-Control-Allow-Origin"] == "http://page.example:8080"
    assert headers["Access-Control-Allow-Headers"] == "x-a"


def test_info_of_an_unknown_project_or_without_one_and_polling_transports_are_refused(server):
    r = plain_get(server.listen, "/sockjs/nosuch/info")
    assert r.status == 404
    assert_error_body(r.body, "unknown_project")
    r = plain_get(server.listen, "/sockjs/info")
    assert r.status == 400
    assert "projectId" in assert_error_body(r.body, "bad_request")["message"]
    for method, path in [
        ("POST", "/sockjs/shop/123/abcdefgh/xhr"),
        ("POST", "/sockjs/shop/123/abcdefgh/xhr_streaming"),
        ("GET", "/sockjs/shop/123/abcdefgh/eventsource"),
        ("GET", "/sockjs/shop/iframe.html"),
    ]:
        status, _, body = request(server, method, path)
        assert status == 404, (path, body)
        assert "websocket" in assert_error_body(body, "not_found")["message"]


def test_the_spring_url_with_token_and_project_in_the_query_speaks_stomp(server):
    async def go():
        query = f"token={mint('alice')}&projectId=shop"
        ws = await sockjs_open(server, "/sockjs", query)
        try:
            assert ws.subprotocol is None
            # The token came with the upgrade: CONNECT needs none.
            await send_messages(ws, frame("CONNECT", {"accept-version": "1.2", "heart-beat": "0,0"}))
            (connected,) = await recv_messages(ws, 1)
            command, headers, _ = parse(connected)
            assert (command, dict(headers)["user-name"]) == ("CONNECTED", "alice")
        finally:
            await ws.close()

    run(go())


def test_the_sockjs_base_without_a_project_is_refused(server):
    async def go():
        try:
            ws = await connect(sockjs_url(server, "/sockjs"), open_timeout=10)
        except InvalidStatus as e:
            assert e.response.status_code == 400
            assert "projectId" in assert_error_body(bytes(e.response.body), "bad_request")["message"]
            return
        await ws.close()
        raise AssertionError("accepted without a project")

    run(go())


def test_several_frames_in_one_array_and_in_one_message_and_a_delivery_exact(server):
    async def go():
        ws = await stomp_over_sockjs(server, mint("alice"))
        try:
            # Two frames, two array elements; then two frames in one element.
            await send_messages(
                ws,
                frame("SUBSCRIBE", {"id": "a", "destination": "/topic/news", "receipt": "r1"}),
                frame("SUBSCRIBE", {"id": "b", "destination": "/topic/sport", "receipt": "r2"}),
            )
            await send_messages(
                ws,
                frame("SUBSCRIBE", {"id": "c", "destination": "/topic/x", "receipt": "r3"})
                + frame("SUBSCRIBE", {"id": "d", "destination": "/user/queue/notice", "receipt": "r4"}),
            )
            receipts = [parse(m) for m in await recv_messages(ws, 4)]
            assert [(c, dict(h)["receipt-id"]) for c, h, _ in receipts] == [
                ("RECEIPT", "r1"),
                ("RECEIPT", "r2"),
                ("RECEIPT", "r3"),
                ("RECEIPT", "r4"),
            ]
            data = '{"quote":"\\"q\\"", "nl":"a\\nb", "u":"\u00e9\u2028"}'
            mid = await apublish(server, f'{{"project":"shop","topic":"news","data":{data}}}')
            raw = await recv_sockjs(ws)
            assert raw.startswith('a["MESSAGE\\n'), raw
            (message,) = json.loads(raw[1:])
            assert message == (
                "MESSAGE\nsubscription:a\ndestination:/topic/news\n"
                f"message-id:{mid}\ncontent-type:application/json\n"
                f"content-length:{len(data.encode())}\n\n{data}\0"
            )
            mid = await apublish(server, '{"project":"shop","topic":"user.alice","data":[1]}')
            (message,) = await recv_messages(ws, 1)
            command, headers, body = parse(message)
            assert (command, dict(headers)["destination"], dict(headers)["message-id"], body) == (
                "MESSAGE",
                "/user/queue/notice",
                mid,
                "[1]",
            )
        finally:
            await ws.close()

    run(go())


def test_a_close_is_preceded_by_c_with_its_code_and_reason(server):
    async def go():
        ws = await stomp_over_sockjs(server, mint("alice"))
        # The STOMP DISCONNECT receipt, then `c[1000,""]`, then the close frame.
        await send_messages(ws, frame("DISCONNECT", {"receipt": "bye"}))
        before = await expect_close(ws, 1000)
        assert json.loads(before[0][1:]) == [frame("RECEIPT", {"receipt-id": "bye"})], before
        assert before[1:] == ['c[1000,""]'], before
        # A refused frame: ERROR, `c[1008,...]`, close 1008.
        ws = await stomp_over_sockjs(server, mint("alice"))
        await send_messages(ws, frame("BEGIN", {"transaction": "t"}))
        before = await expect_close(ws, 1008)
        command, headers, _ = parse(json.loads(before[0][1:])[0])
        assert (command, dict(headers)["message"]) == (
            "ERROR",
            "transactions (BEGIN, COMMIT, ABORT) are not supported",
        )
        assert before[1:] == ['c[1008,"STOMP frame refused"]'], before

    run(go())


def test_a_message_that_is_not_a_json_array_of_strings_closes_1007(server):
    async def go():
        for bad in ["CONNECT\n\n\0", "[1,2]", '{"a":1}', "[\"unterminated"]:
            ws = await stomp_over_sockjs(server, mint("alice"))
            await ws.send(bad)
            before = await expect_close(ws, 1007)
            command, headers, _ = parse(json.loads(before[0][1:])[0])
            assert (command, dict(headers)["message"]) == (
                "ERROR",
                "a SockJS message must be a JSON array of strings",
            ), bad
            assert before[1:] == ['c[1007,"invalid SockJS message"]'], (bad, before)
        # herald.v1 inside SockJS: no ERROR frame, the `c` and the close.
        ws = await sockjs_open(server, query=f"protocol=herald.v1&token={mint('alice')}")
        (welcome,) = await recv_messages(ws, 1)
        assert json.loads(welcome)["type"] == "welcome"
        await ws.send("not json")
        assert await expect_close(ws, 1007) == ['c[1007,"invalid SockJS message"]']

    run(go())


def test_heart_beat_h_from_the_sweep(servers):
    server = servers.start(config=config_toml(shards=1).replace("heartbeat_interval_ms = 25000", "heartbeat_interval_ms = 300"))

    async def go():
        ws = await stomp_over_sockjs(server, mint("alice"))
        try:
            # The sweep's visits: each one a WebSocket ping (answered by the client library)
            # and an `h`; no STOMP heart-beat, since CONNECT asked for none.
            frames = [await asyncio.wait_for(ws.recv(), 5) for _ in range(3)]
            assert frames == ["h", "h", "h"], frames
        finally:
            await ws.close()

    run(go())


def test_herald_v1_inside_sockjs_with_protocol_in_the_query(server):
    async def go():
        ws = await sockjs_open(server, query=f"protocol=herald.v1&token={mint('alice')}")
        try:
            (welcome,) = await recv_messages(ws, 1)
            assert json.loads(welcome)["type"] == "welcome"
            await send_messages(ws, json.dumps({"op": "subscribe", "topic": "news", "id": 1}))
            assert [json.loads(m) for m in await recv_messages(ws, 1)] == [{"type": "ack", "id": 1}]
            mid = await apublish(server, '{"project":"shop","topic":"news","data":{"k": "v"}}')
            (raw,) = await recv_messages(ws, 1)
            assert raw.startswith('{"type":"message","topic":"news","data":{"k": "v"},'), raw
            assert json.loads(raw)["id"] == mid
        finally:
            await ws.close()

    run(go())


def test_one_publish_reaches_herald_v1_stomp_and_sockjs_subscribers(server):
    async def go():
        v1, _ = await client(server, "alice")
        await subscribe(v1, "news")
        st = await stomp_ws(server, headers={"Authorization": f"Bearer {mint('bob')}"})
        await st.send(frame("CONNECT", {"accept-version": "1.2"}))
        assert (await recv_frame(st))[0] == "CONNECTED"
        await st.send(frame("SUBSCRIBE", {"id": "s", "destination": "/topic/news", "receipt": "r"}))
        assert (await recv_frame(st))[0] == "RECEIPT"
        sj = await stomp_over_sockjs(server, mint("carol"))
        await send_messages(sj, frame("SUBSCRIBE", {"id": "j", "destination": "/topic/news", "receipt": "r"}))
        assert parse((await recv_messages(sj, 1))[0])[0] == "RECEIPT"
        sv = await sockjs_open(server, query=f"protocol=herald.v1&token={mint('dave')}")
        await recv_messages(sv, 1)
        await send_messages(sv, json.dumps({"op": "subscribe", "topic": "news", "id": 1}))
        await recv_messages(sv, 1)
        try:
            data = '{"n": 1, "s": "x\\u0000y"}'
            mid = await apublish(server, f'{{"project":"shop","topic":"news","data":{data}}}')
            raw = await asyncio.wait_for(v1.recv(), RECV_TIMEOUT)
            assert json.loads(raw) == {**json.loads(raw), "id": mid}
            v1_text = raw
            assert f'"data":{data},' in v1_text
            _, headers, body = await recv_frame(st)
            assert (headers["subscription"], headers["message-id"], body) == ("s", mid, data)
            (m,) = await recv_messages(sj, 1)
            _, headers, body = parse(m)
            assert (dict(headers)["subscription"], dict(headers)["message-id"], body) == ("j", mid, data)
            (m,) = await recv_messages(sv, 1)
            assert m == v1_text, "the same herald.v1 frame, inside SockJS"
        finally:
            await close_all([v1, st, sj, sv])

    run(go())
