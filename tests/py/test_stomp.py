"""STOMP over WebSocket, spoken by a raw client as Spring's brokers and clients write it:
frames split across messages, several frames per message, CRLF, escaped headers,
`content-length` bodies holding NUL, receipts, errors and the mixed fan-out with herald.v1.
docs/stomp.md is the contract."""

from __future__ import annotations

import asyncio
import json
import time

from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from herald_client import (
    HEARTBEAT_MS,
    RECV_TIMEOUT,
    apublish,
    client,
    close_all,
    config_toml,
    expect_close,
    expect_silence,
    mint,
    recv_json,
    run,
    subscribe,
)

STOMP_PROTOCOLS = ["v10.stomp", "v11.stomp", "v12.stomp"]


def frame(command: str, headers: dict | list = (), body: bytes | str = b"", eol: str = "\n") -> str:
    """A client frame as text (STOMP over WebSocket uses text messages)."""
    if isinstance(body, bytes):
        body = body.decode()
    items = headers.items() if isinstance(headers, dict) else headers
    lines = [command, *(f"{k}:{v}" for k, v in items)]
    return eol.join(lines) + eol + eol + body + "\0"


def parse(raw: str) -> tuple[str, list[tuple[str, str]], str]:
    """A server frame: (command, headers in order, body)."""
    assert raw.endswith("\0"), repr(raw)
    head, _, body = raw[:-1].partition("\n\n")
    command, *lines = head.split("\n")
    return command, [tuple(line.split(":", 1)) for line in lines], body


async def recv_frame(ws, timeout: float = RECV_TIMEOUT) -> tuple[str, dict, str]:
    """The next server frame, heart-beats skipped: (command, headers, body)."""
    while True:
        try:
            raw = await asyncio.wait_for(ws.recv(), timeout)
        except asyncio.TimeoutError:
            raise AssertionError(f"no STOMP frame within {timeout}s") from None
        assert isinstance(raw, str), raw
        if raw.strip("\r\n") == "":
            continue
        command, headers, body = parse(raw)
        return command, dict(headers), body


async def stomp_ws(server, path: str = "/ws/shop", protocols=STOMP_PROTOCOLS, headers=None):
    return await connect(
        f"{server.ws_url}{path}",
        subprotocols=protocols,
        additional_headers=headers,
        open_timeout=10,
        close_timeout=3,
        ping_interval=None,
    )


async def stomp_connect(server, token: str | None = None, **kwargs):
    """Opens a STOMP connection with the token in CONNECT; returns (ws, CONNECTED headers)."""
    ws = await stomp_ws(server, **kwargs)
    hdrs = {"accept-version": "1.2,1.1,1.0", "heart-beat": "10000,10000"}
    if token is not None:
        hdrs["Authorization"] = f"Bearer {token}"
    await ws.send(frame("CONNECT", hdrs))
    command, headers, _ = await recv_frame(ws)
    assert command == "CONNECTED", (command, headers)
    return ws, headers


def test_the_highest_stomp_subprotocol_is_answered_and_connect_takes_the_token(server):
    async def go():
        ws, headers = await stomp_connect(server, mint("alice"))
        try:
            assert ws.subprotocol == "v12.stomp"
            assert headers["version"] == "1.2"
            assert headers["heart-beat"] == f"{HEARTBEAT_MS},0"
            assert headers["user-name"] == "alice"
        finally:
            await ws.close()
        ws, headers = await stomp_connect(server, mint("alice"), protocols=["v10.stomp", "v11.stomp"])
        try:
            assert (ws.subprotocol, headers["version"]) == ("v11.stomp", "1.1")
        finally:
            await ws.close()

    run(go())


def test_the_plain_path_speaks_stomp_without_a_subprotocol(server):
    async def go():
        ws, headers = await stomp_connect(server, mint("alice"), path="/stomp/shop", protocols=None)
        try:
            assert ws.subprotocol is None
            assert headers["version"] == "1.2"
        finally:
            await ws.close()

    run(go())


def test_a_token_at_the_upgrade_needs_none_in_connect(server):
    async def go():
        ws = await stomp_ws(server, headers={"Authorization": f"Bearer {mint('alice')}"})
        try:
            await ws.send(frame("CONNECT", {"accept-version": "1.2", "passcode": "ignored"}))
            command, headers, _ = await recv_frame(ws)
            assert (command, headers["user-name"]) == ("CONNECTED", "alice")
        finally:
            await ws.close()

    run(go())


def test_passcode_carries_the_token(server):
    async def go():
        ws = await stomp_ws(server)
        try:
            await ws.send(frame("CONNECT", {"accept-version": "1.2", "passcode": mint("bob")}))
            command, headers, _ = await recv_frame(ws)
            assert (command, headers["user-name"]) == ("CONNECTED", "bob")
        finally:
            await ws.close()

    run(go())


def test_a_bad_or_missing_token_gets_an_error_then_close(server):
    async def go():
        for hdrs in ({"Authorization": "Bearer nope"}, {}, {"passcode": mint("a", exp=1)}):
            ws = await stomp_ws(server)
            await ws.send(frame("CONNECT", {"accept-version": "1.2", **hdrs}))
            before = await expect_close(ws, 1008)
            assert len(before) == 1, before
            command, headers, body = parse(before[0])
            assert command == "ERROR", before
            assert headers[0][0] == "message" and headers[0][1], headers
            assert body == headers[0][1].replace("\\c", ":"), (headers, body)

    run(go())


def test_topics_and_user_queues_receive_backend_publishes_byte_for_byte(server):
    async def go():
        ws, _ = await stomp_connect(server, mint("alice"))
        try:
            await ws.send(
                frame("SUBSCRIBE", {"id": "sub-0", "destination": "/topic/news", "receipt": "r1"})
                + frame("SUBSCRIBE", {"id": "sub-1", "destination": "/user/queue/notice"})
                + frame("SUBSCRIBE", {"id": "sub-2", "destination": "/topic/all", "receipt": "r2"})
            )
            assert await recv_frame(ws) == ("RECEIPT", {"receipt-id": "r1"}, "")
            assert await recv_frame(ws) == ("RECEIPT", {"receipt-id": "r2"}, "")
            data = '{"b": 1,  "a":[1.50, "x"]}'
            mid = await apublish(server, '{"project":"shop","topic":"news","data":' + data + "}")
            raw = await asyncio.wait_for(ws.recv(), RECV_TIMEOUT)
            assert raw == (
                "MESSAGE\nsubscription:sub-0\ndestination:/topic/news\n"
                f"message-id:{mid}\ncontent-type:application/json\n"
                f"content-length:{len(data)}\n\n{data}\0"
            ), raw
            mid = await apublish(server, {"project": "shop", "topic": "user.alice", "data": {"n": 1}})
            assert await recv_frame(ws) == (
                "MESSAGE",
                {
                    "subscription": "sub-1",
                    "destination": "/user/queue/notice",
                    "message-id": mid,
                    "content-type": "application/json",
                    "content-length": "8",
                },
                '{"n": 1}',
            )
            mid = await apublish(server, {"project": "shop", "topic": "all", "data": 1})
            command, headers, body = await recv_frame(ws)
            assert (headers["subscription"], headers["destination"], body) == ("sub-2", "/topic/all", "1")
            await expect_silence(ws)
        finally:
            await ws.close()

    run(go())


def test_spring_push_center_destinations_name_the_project_and_use_slashes(server):
    """The seed's clients subscribe to `/topic/<projectId>/<topic>`: the project is dropped and
    `/` is herald's `.`, and MESSAGE echoes the destination as subscribed."""

    async def go():
        ws, _ = await stomp_connect(server, mint("alice"))
        try:
            await ws.send(
                frame("SUBSCRIBE", {"id": "a", "destination": "/topic/shop/shanghai", "receipt": "r1"})
                + frame("SUBSCRIBE", {"id": "b", "destination": "/topic/orders/eu", "receipt": "r2"})
            )
            assert await recv_frame(ws) == ("RECEIPT", {"receipt-id": "r1"}, "")
            assert await recv_frame(ws) == ("RECEIPT", {"receipt-id": "r2"}, "")
            for topic, sub, destination in (
                ("shanghai", "a", "/topic/shop/shanghai"),
                ("orders.eu", "b", "/topic/orders/eu"),
            ):
                mid = await apublish(server, {"project": "shop", "topic": topic, "data": {"t": topic}})
                command, headers, body = await recv_frame(ws)
                assert (command, headers["subscription"], headers["destination"], headers["message-id"]) == (
                    "MESSAGE",
                    sub,
                    destination,
                    mid,
                ), headers
                assert json.loads(body) == {"t": topic}
            await expect_silence(ws)
        finally:
            await ws.close()

    run(go())


def test_spring_style_frames_split_crlf_escaped_nul_bodies_and_batched(servers):
    text = config_toml().replace('id = "shop"\n', 'id = "shop"\nallow_client_publish = true\n')
    server = servers.start(config=text)

    async def go():
        ws, _ = await stomp_connect(server, mint("alice"))
        watcher, _ = await client(server, "bob")
        try:
            await subscribe(watcher, "news")
            # One SUBSCRIBE split over three messages, with CRLF line ends and an escaped id.
            sub = frame("SUBSCRIBE", {"id": "a\\cb\\\\c", "destination": "/topic/news", "receipt": "s"}, eol="\r\n")
            for part in (sub[:7], sub[7:30], sub[30:]):
                await ws.send(part)
            assert await recv_frame(ws) == ("RECEIPT", {"receipt-id": "s"}, "")
            # Two SENDs in one message with a heart-beat between them: the first with a
            # content-length body, the second plain (`/app/<t>` publishes to `<t>`).
            body = '{"t":"x"}'
            await ws.send(
                frame("SEND", {"destination": "/topic/news", "content-length": len(body), "receipt": "p1"}, body)
                + "\n"
                + frame("SEND", {"destination": "/app/news", "receipt": "p2"}, '{"t":"y"}')
            )
            got = [await recv_frame(ws) for _ in range(4)]
            receipts = [g for g in got if g[0] == "RECEIPT"]
            messages = [g for g in got if g[0] == "MESSAGE"]
            assert receipts == [("RECEIPT", {"receipt-id": "p1"}, ""), ("RECEIPT", {"receipt-id": "p2"}, "")]
            # The id `a:b\c` comes back escaped as it was sent.
            assert [(m[1]["subscription"], m[2]) for m in messages] == [
                ("a\\cb\\\\c", '{"t":"x"}'),
                ("a\\cb\\\\c", '{"t":"y"}'),
            ], messages
            for data in ({"t": "x"}, {"t": "y"}):
                _, msg = await recv_json(watcher)
                assert (msg["topic"], msg["data"]) == ("news", data)
            # A content-length body with a NUL in it is read whole: not JSON, so refused.
            nul = 'x\0y'
            await ws.send(frame("SEND", {"destination": "/topic/news", "content-length": 3, "receipt": "p3"}, nul))
            before = await expect_close(ws, 1008)
            command, headers, body = parse(before[-1])
            assert (command, dict(headers)["message"], dict(headers)["receipt-id"]) == (
                "ERROR",
                "a SEND body must be JSON",
                "p3",
            )
        finally:
            await close_all([ws, watcher])

    run(go())


def test_one_publish_reaches_herald_v1_and_stomp_subscribers(server):
    async def go():
        stomp, _ = await stomp_connect(server, mint("alice"))
        v1, _ = await client(server, "bob")
        try:
            await subscribe(v1, "news")
            await stomp.send(frame("SUBSCRIBE", {"id": "0", "destination": "/topic/news", "receipt": "r"}))
            assert (await recv_frame(stomp))[0] == "RECEIPT"
            mid = await apublish(server, {"project": "shop", "topic": "news", "data": {"k": [1, 2]}})
            command, headers, body = await recv_frame(stomp)
            assert (command, headers["message-id"], json.loads(body)) == ("MESSAGE", mid, {"k": [1, 2]})
            _, msg = await recv_json(v1)
            assert (msg["id"], msg["data"]) == (mid, {"k": [1, 2]})
        finally:
            await close_all([stomp, v1])

    run(go())


def test_unsupported_and_forbidden_frames_get_an_error_then_close(server):
    async def go():
        cases = [
            (frame("BEGIN", {"transaction": "t1", "receipt": "b"}), "transactions (BEGIN, COMMIT, ABORT) are not supported"),
            (frame("SUBSCRIBE", {"id": "1", "destination": "/queue/jobs"}), "`/queue/` destinations are not supported"),
            (frame("SUBSCRIBE", {"id": "1", "destination": "/topic/user.bob"}), "user. and device. topics"),
            (frame("SEND", {"destination": "/topic/news"}, "{}"), "this project does not let clients publish"),
            (frame("MESSAGE", {}), "unknown command `MESSAGE`"),
        ]
        for sent, message in cases:
            ws, _ = await stomp_connect(server, mint("alice", topics=["news"]))
            await ws.send(sent)
            before = await expect_close(ws, 1008)
            command, headers, _ = parse(before[-1])
            assert command == "ERROR", before
            assert dict(headers)["message"].replace("\\c", ":").startswith(message), (sent, headers)
        # The token's `topics` claim applies as for herald.v1.
        ws, _ = await stomp_connect(server, mint("alice", topics=["news"]))
        await ws.send(frame("SUBSCRIBE", {"id": "1", "destination": "/topic/sport"}))
        before = await expect_close(ws, 1008)
        assert "the token does not allow `sport`" in before[-1], before

    run(go())


def test_ack_nack_accepted_unsubscribe_stops_delivery_and_disconnect_gets_its_receipt(server):
    async def go():
        ws, _ = await stomp_connect(server, mint("alice"))
        await ws.send(frame("SUBSCRIBE", {"id": "s", "destination": "/topic/news", "ack": "client", "receipt": "s"}))
        assert await recv_frame(ws) == ("RECEIPT", {"receipt-id": "s"}, "")
        mid = await apublish(server, {"project": "shop", "topic": "news", "data": 2})
        command, headers, _ = await recv_frame(ws)
        assert (command, headers["ack"]) == ("MESSAGE", mid)
        await ws.send(frame("ACK", {"id": mid, "receipt": "a"}) + frame("NACK", {"id": mid, "receipt": "n"}))
        assert await recv_frame(ws) == ("RECEIPT", {"receipt-id": "a"}, "")
        assert await recv_frame(ws) == ("RECEIPT", {"receipt-id": "n"}, "")
        await ws.send(frame("UNSUBSCRIBE", {"id": "s", "receipt": "u"}))
        assert await recv_frame(ws) == ("RECEIPT", {"receipt-id": "u"}, "")
        await apublish(server, {"project": "shop", "topic": "news", "data": 3})
        await expect_silence(ws)
        await ws.send(frame("DISCONNECT", {"receipt": "bye"}))
        before = await expect_close(ws, 1000)
        assert before == ["RECEIPT\nreceipt-id:bye\n\n\0"], before

    run(go())


def test_a_frame_over_the_message_limit_gets_an_error_then_1009(server):
    async def go():
        ws, _ = await stomp_connect(server, mint("alice"))
        # Two messages under the 64 KiB message limit, one frame over it.
        part = "SEND\ndestination:/topic/news\n\n" + "x" * 40_000
        await ws.send(part)
        await ws.send("y" * 40_000)
        before = await expect_close(ws, 1009)
        command, headers, _ = parse(before[-1])
        assert (command, dict(headers)["message"]) == ("ERROR", "frame over 65536 bytes")

    run(go())


def test_connect_must_come_within_the_handshake_deadline(servers):
    server = servers.start(config=config_toml(extra="").replace("[ws]\n", "[ws]\nhandshake_timeout_ms = 500\n"))

    async def go():
        ws = await stomp_ws(server)
        try:
            await asyncio.wait_for(ws.recv(), 10)
            raise AssertionError("a frame arrived")
        except ConnectionClosed:
            pass

    run(go())


def test_expiry_during_the_connection_is_an_error_then_4001(servers):
    # No leeway: the connection must end when `exp` passes.
    text = config_toml().replace('id = "shop"\n', 'id = "shop"\nleeway_secs = 0\n')
    server = servers.start(config=text)

    async def go():
        ws, _ = await stomp_connect(server, mint("alice", exp=int(time.time()) + 2))
        before = await expect_close(ws, 4001, timeout=10)
        assert before[-1] == (
            "ERROR\nmessage:token expired\ncontent-type:text/plain\ncontent-length:13\n\ntoken expired\0"
        ), before

    run(go())


def test_stomp_1_0_headers_are_not_escaped(server):
    async def go():
        ws = await stomp_ws(server, protocols=["v10.stomp"])
        try:
            assert ws.subprotocol == "v10.stomp"
            await ws.send(frame("CONNECT", {"passcode": mint("alice")}))
            command, headers, _ = await recv_frame(ws)
            assert (command, headers["version"]) == ("CONNECTED", "1.0")
            # In 1.0 a backslash is a backslash, in and out; 1.0 allows a SUBSCRIBE without
            # an id (the destination names it).
            await ws.send(frame("SUBSCRIBE", {"id": "a\\cb", "destination": "/topic/news", "receipt": "r"}))
            await ws.send(frame("SUBSCRIBE", {"destination": "/topic/sport"}))
            assert await recv_frame(ws) == ("RECEIPT", {"receipt-id": "r"}, "")
            await apublish(server, {"project": "shop", "topic": "news", "data": 1})
            _, headers, _ = await recv_frame(ws)
            assert headers["subscription"] == "a\\cb", headers
            await apublish(server, {"project": "shop", "topic": "sport", "data": 2})
            _, headers, _ = await recv_frame(ws)
            assert headers["subscription"] == "/topic/sport", headers
        finally:
            await ws.close()

    run(go())


def test_a_drain_is_an_error_naming_it_then_1001(server):
    async def go():
        ws, _ = await stomp_connect(server, mint("alice"))
        server.stopped_by_test = True
        stopping = asyncio.create_task(asyncio.to_thread(server.stop))
        before = await expect_close(ws, 1001, timeout=15)
        command, headers, body = parse(before[-1])
        assert (command, dict(headers)["message"], body) == (
            "ERROR",
            "server shutting down",
            "server shutting down",
        ), before
        await stopping

    run(go())
