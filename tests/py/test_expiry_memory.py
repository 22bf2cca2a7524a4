"""Token expiry bookkeeping stays O(open connections): connection churn and refresh loops
leave no memory behind.

Every connection with an `exp` has an entry in its shard's expiry heap, and every refresh
that changes `exp` queues a new one. Entries that no longer count (superseded by a refresh,
or of a connection that left) must not pile up: each test drives far more entries than the
connections it leaves open, then asserts the server's resident memory (VmRSS) is back within
a small bound of a baseline taken after a warm-up of the same shape (so the slab, topic
index and allocator caches are already at their working size).

Raw sockets keep the client cheap: the upgrade is written by hand, frames are parsed with the
helpers of test_hostile.py. Churned sockets are closed with a reset (SO_LINGER 0), so no
TIME_WAIT state exhausts the ephemeral ports.
"""

from __future__ import annotations

import json
import re
import socket
import struct
import time

import pytest

from herald_client import ADMIN_KEY, config_toml, http_request, mint, now
from test_hostile import (
    client_frame,
    parse_frame,
    parse_http,
    raw_connect,
    raw_ws,
    rss_kib,
    upgrade_request,
)

#: RSS allowed above the baseline once the load is over, KiB. Measured with the heap kept
#: bounded (debug build, 2 shards, mimalloc): refresh loop within +/-100 KiB; churn +0.1 to
#: +1.5 MiB (allocator pages still held; it does not grow with the number of connections).
#: Without the bound the entries alone held 16 B each: 200,000 refreshes kept +3.4 MiB and
#: 100,000 churned connections +1.9 MiB, which the churn bound cannot tell from noise: the
#: heap's own gauge (`herald_expiry_entries`) is asserted exactly as well.
RSS_REFRESH_BOUND_KIB = 1024
RSS_CHURN_BOUND_KIB = 2560
#: Expiry entries a shard may hold: twice its connections plus this slack.
EXPIRY_SLACK = 64

#: Connections refreshing, and refreshes each; refreshes sent back to back per round.
REFRESH_CONNS = 4
REFRESHES_PER_CONN = 50_000
REFRESH_ROUND = 1000
#: Connections opened and closed in all, and at once.
CHURN_TOTAL = 100_000
CHURN_BATCH = 500

SRC = "127.0.0.1"
DAY = 24 * 3600


#: Handshake deadline of the test server, ms. Each handshake's deadline stays queued this
#: long (done or not), so the churn's queue drains this long after the last connection.
HANDSHAKE_TIMEOUT_MS = 1000


@pytest.fixture
def server(servers):
    # Every limit off, the refresh rate included: the tests measure bookkeeping, not limits.
    config = config_toml(limits={"refreshes_per_conn_per_min": 0})
    config = config.replace("[ws]\n", f"[ws]\nhandshake_timeout_ms = {HANDSHAKE_TIMEOUT_MS}\n", 1)
    return servers.start(config=config)


def expiry_entries(server) -> list[int]:
    """`herald_expiry_entries` of every shard, from /metrics."""
    r = http_request("GET", f"{server.api_url}/metrics")
    assert r.status == 200, r
    found = re.findall(rb'^herald_expiry_entries\{shard="(\d+)"\} (\d+)$', r.body, re.M)
    assert found, "no herald_expiry_entries in /metrics"
    return [int(n) for _, n in sorted(found)]


def settled_rss(server, seconds: float = 4.0) -> int:
    """VmRSS once the handshake deadlines queued by the load have passed, the sweep (ticks
    <= 1 s) has run and the allocator has given back what it frees lazily: the lowest of a
    few samples over `seconds`."""
    samples = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(0.25)
        samples.append(rss_kib(server))
    return min(samples)


def read_texts(s: socket.socket, buf: bytes, n: int) -> tuple[list[bytes], bytes]:
    """The next `n` text frames (pings skipped); returns them and the bytes left over."""
    texts: list[bytes] = []
    s.settimeout(30)
    while len(texts) < n:
        while (f := parse_frame(buf)) is not None:
            op, payload, buf = f
            assert op in (0x1, 0x9), f"opcode {op}: {payload[:200]!r}"
            if op == 0x1:
                texts.append(payload)
        if len(texts) < n:
            chunk = s.recv(1 << 20)
            assert chunk, f"EOF after {len(texts)} of {n} frames"
            buf += chunk
    assert len(texts) == n, f"{len(texts) - n} frames more than asked for"
    return texts, buf


def reset_close(s: socket.socket) -> None:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def refresh_rounds(conns: list, tokens: list[tuple[bytes, bytes]], exps: tuple[int, int], rounds: int) -> None:
    """`rounds` rounds of REFRESH_ROUND refreshes on every connection, alternating two tokens
    whose `exp` differ (so every refresh changes the connection's expiry); each is acked."""
    for _ in range(rounds):
        for i, (s, _) in enumerate(conns):
            a, b = tokens[i]
            s.sendall((a + b) * (REFRESH_ROUND // 2))
        for i, (s, buf) in enumerate(conns):
            texts, conns[i][1] = read_texts(s, buf, REFRESH_ROUND)
            want = [{"type": "ack", "exp": exps[k % 2]} for k in range(REFRESH_ROUND)]
            assert [json.loads(t) for t in texts] == want


def test_refresh_loop_leaves_no_memory_behind(server):
    """200,000 refreshes (4 connections, each alternating between two `exp`s 1 s apart,
    24 h ahead), then the connections close: RSS is back at the baseline."""
    exps = (now() + DAY, now() + DAY + 1)
    users = [f"refresher{i}" for i in range(REFRESH_CONNS)]
    tokens = [
        tuple(
            client_frame(0x1, json.dumps({"op": "refresh", "token": mint(u, exp=e)}).encode())
            for e in exps
        )
        for u in users
    ]
    conns = [list(raw_ws(server, SRC, mint(u, exp=exps[0]))) for u in users]
    for c in conns:
        (welcome,), c[1] = read_texts(c[0], c[1], 1)
        assert json.loads(welcome)["type"] == "welcome", welcome
    refresh_rounds(conns, tokens, exps, 2)
    baseline = settled_rss(server)
    started = time.monotonic()
    refresh_rounds(conns, tokens, exps, REFRESHES_PER_CONN // REFRESH_ROUND)
    print(f"{REFRESH_CONNS * REFRESHES_PER_CONN} refreshes in {time.monotonic() - started:.1f} s")
    loaded = rss_kib(server)
    during = expiry_entries(server)
    assert max(during) <= 2 * REFRESH_CONNS + EXPIRY_SLACK, during
    for s, _ in conns:
        reset_close(s)
    after = settled_rss(server)
    print(f"RSS: baseline {baseline} KiB, loaded {loaded} KiB, after {after} KiB")
    assert max(expiry_entries(server)) <= EXPIRY_SLACK
    assert after - baseline < RSS_REFRESH_BOUND_KIB, (
        f"RSS {after} KiB after the refresh loop, {after - baseline} KiB over the baseline "
        f"{baseline} KiB (loaded: {loaded} KiB)"
    )


def wait_until_empty(server, timeout: float = 30.0) -> None:
    """Waits until the server has removed every connection (so a batch never overlaps the
    next one and the peak number of open connections stays CHURN_BATCH)."""
    deadline = time.monotonic() + timeout
    while True:
        r = http_request("GET", f"{server.api_url}/api/v1/stats", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
        assert r.status == 200, r
        if r.json()["connections"] == 0:
            return
        assert time.monotonic() < deadline, f"still {r.json()['connections']} connections"
        time.sleep(0.005)


def churn(server, token: str, total: int) -> None:
    """Opens and resets `total` connections, CHURN_BATCH at a time, each until its 101."""
    request = upgrade_request(token)
    for _ in range(total // CHURN_BATCH):
        batch = [raw_connect(server, SRC) for _ in range(CHURN_BATCH)]
        for s in batch:
            s.sendall(request)
        for s in batch:
            buf = b""
            while (r := parse_http(buf)) is None:
                chunk = s.recv(4096)
                assert chunk, f"EOF during the upgrade; got {buf!r}"
                buf += chunk
            assert r[0] == 101, r
        for s in batch:
            reset_close(s)
        wait_until_empty(server)


def test_connection_churn_leaves_no_memory_behind(server):
    """100,000 connections with a 24 h token, 500 open at a time, each closed right after
    its upgrade: RSS is back at the baseline taken after one warm-up batch."""
    token = mint("churner", exp=now() + DAY)
    churn(server, token, 10 * CHURN_BATCH)
    baseline = settled_rss(server)
    started = time.monotonic()
    churn(server, token, CHURN_TOTAL)
    print(f"{CHURN_TOTAL} connections in {time.monotonic() - started:.1f} s")
    after = settled_rss(server)
    print(f"RSS: baseline {baseline} KiB, after {after} KiB")
    # Every token outlives the test, so without the bound every connection's entry stays.
    assert max(expiry_entries(server)) <= EXPIRY_SLACK
    assert after - baseline < RSS_CHURN_BOUND_KIB, (
        f"RSS {after} KiB after the churn, {after - baseline} KiB over the baseline {baseline} KiB"
    )
