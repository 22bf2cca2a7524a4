"""SIGTERM / SIGINT: every client gets close 1001 and the process exits 0 within the drain."""

import asyncio
import signal
import time

import pytest

from herald_client import client, expect_close, run


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_closes_clients_1001_and_exits_0(server, sig):
    async def go():
        # Several per project so that, with 2 shards, both shards almost surely hold some.
        conns = [(await client(server, f"u{i}", "shop"))[0] for i in range(6)]
        conns += [(await client(server, f"u{i}", "blog"))[0] for i in range(3)]
        server.stopped_by_test = True
        started = time.monotonic()
        server.proc.send_signal(sig)
        await asyncio.gather(*(expect_close(ws, 1001, timeout=10) for ws in conns))
        code = await asyncio.to_thread(server.proc.wait, max(0.1, 10 - (time.monotonic() - started)))
        return code

    try:
        code = run(go(), timeout=30)
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    assert code == 0, f"exit code {code}; stderr:\n{server.stderr_tail()}"
