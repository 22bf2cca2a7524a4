"""An idle shard gives back the memory its arrays freed as they grew.

The slab of connections, the topic index, the deadline queues and the expiry heap grow by
doubling; each growth frees the old copy, which the allocator keeps until the thread that owns
it allocates again, which an idle shard does not. The sweep asks the allocator to return it
once the arrays changed size (a large slab doubling at once), and only then: never again
while the load is steady (`herald_allocator_collects`).
"""

from __future__ import annotations

import re
import time

import pytest

from herald_client import config_toml, http_request, mint
from test_hostile import raw_ws

#: Connections opened (over 2 shards: each shard's slab grows to 2,048 entries).
N = 3000
#: Source addresses, so the client's ephemeral ports never run out.
SOURCES = [f"127.0.0.{i}" for i in range(2, 6)]
#: Handshake deadline of the test server, ms: the deadline queue drains (and gives back its
#: room) this long after the last handshake.
HANDSHAKE_TIMEOUT_MS = 1000
#: Sweep ticks the steady check waits (a tick is 1 s with the suite's 25 s heartbeat).
STEADY_TICKS = 4


@pytest.fixture
def server(servers):
    config = config_toml()
    config = config.replace("[ws]\n", f"[ws]\nhandshake_timeout_ms = {HANDSHAKE_TIMEOUT_MS}\n", 1)
    return servers.start(config=config)


def collects(server) -> int:
    """`herald_allocator_collects_total`, from /metrics."""
    r = http_request("GET", f"{server.api_url}/metrics")
    assert r.status == 200, r
    found = re.findall(rb"^herald_allocator_collects_total (\d+)$", r.body, re.M)
    assert len(found) == 1, "no herald_allocator_collects_total in /metrics"
    return int(found[0])


def wait_for(what: str, check, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_growth_is_given_back_once_then_nothing_while_idle(server):
    # The shards' first ticks see their empty arrays once.
    time.sleep(2)
    before = collects(server)
    started = time.monotonic()
    conns = [raw_ws(server, SOURCES[i % len(SOURCES)], mint(f"idle{i}"))[0] for i in range(N)]
    wait_for("a collect after the arrays grew", lambda: collects(server) > before)
    # The handshake deadlines pass and their queue gives back its room: one more change.
    time.sleep(HANDSHAKE_TIMEOUT_MS / 1000 + 2)
    settled = collects(server)
    ticks = time.monotonic() - started + 1
    # At most one per tick, plus one per doubling of a slab from 1,024 entries (2 per shard).
    assert settled - before <= 2 * ticks + 4, f"{settled - before} collects in {ticks:.0f} ticks"
    time.sleep(STEADY_TICKS + 0.5)
    assert collects(server) == settled, "collected again while nothing changed"
    for s in conns:
        s.close()
