"""Many concurrent connections across shards all receive one broadcast."""

import asyncio
import json
import time

import pytest

from herald_client import apublish, assert_delivery, mint, open_ws, recv_json, run

N = 2000
#: Handshakes in flight at once.
BATCH = 100
DATA = '{"big": "broadcast",  "n":2000, "f": 1.50}'


@pytest.mark.timeout(150)
def test_2000_connections_receive_one_broadcast(server):
    async def go():
        gate = asyncio.Semaphore(BATCH)
        token = mint("fan", exp=int(time.time()) + 3600)

        async def one(i):
            async with gate:
                ws = await open_ws(
                    server, "shop", token, via=("header", "query", "subprotocol")[i % 3],
                    compression=None, open_timeout=30,
                )
                _, welcome = await recv_json(ws, timeout=30)
                assert welcome["type"] == "welcome", welcome
                return ws

        results = await asyncio.gather(*(one(i) for i in range(N)), return_exceptions=True)
        conns = [r for r in results if not isinstance(r, BaseException)]
        errors = [r for r in results if isinstance(r, BaseException)]
        try:
            assert not errors, f"{len(errors)} of {N} connections failed, first: {errors[0]!r}"
            mid = await apublish(server, '{"project":"shop","topic":"all","data":' + DATA + "}")
            got = await asyncio.gather(*(recv_json(ws, timeout=30) for ws in conns))
            assert len(got) == N
            for raw, msg in got:
                assert '"data":' + DATA in raw, raw
                assert_delivery(msg, "all", json.loads(DATA), mid)
            # Exactly one each: a second broadcast is the very next frame everywhere.
            mid2 = await apublish(server, {"project": "shop", "topic": "all", "data": 2})
            got = await asyncio.gather(*(recv_json(ws, timeout=30) for ws in conns))
            for _, msg in got:
                assert_delivery(msg, "all", 2, mid2)
        finally:
            closer = asyncio.Semaphore(BATCH * 2)

            async def close(ws):
                async with closer:
                    await ws.close()

            await asyncio.gather(*(close(ws) for ws in conns), return_exceptions=True)

    run(go(), timeout=120)
