"""Admission under attack, against the real binary: idle sockets from a few addresses cannot
lock everyone else out of the client port, and a flood of refused handshakes (malformed ones
included) is rate limited and logged as a summary, not one line each.

Attackers bind 127.0.0.2 and up; good clients bind 127.0.1.x (loopback holds all of 127/8).
"""

from __future__ import annotations

import asyncio
import re
import resource
import selectors
import socket
import time

import pytest

from herald_client import Server, config_toml, mint, open_ws, recv_json, run
from test_hostile import attacker, cfg, raw_connect, stats

#: The shipped [limits] (herald_client's suite turns the per-address ones off).
DEFAULT_LIMITS = {
    "handshakes_per_ip_per_sec": 50,
    "handshake_burst_per_ip": 100,
    "connections_per_ip": 1000,
    "max_pending_handshakes": 10_000,
    "max_pending_handshakes_per_ip": 64,
}
ATTACK_ADDRS, PER_ADDR = 10, 1100
#: A good client must get its welcome within this many seconds while the attack holds.
WELCOME_WITHIN = 1.0
GOOD_CLIENTS = 20


def good_addr(i: int) -> str:
    return f"127.0.1.{1 + i}"


class OpenFiles:
    """Raises this process's soft RLIMIT_NOFILE to the hard one for the block (the spawned
    server inherits it), and restores it after."""

    def __init__(self, need: int):
        self.need = need

    def __enter__(self) -> None:
        self.soft, self.hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if self.hard != resource.RLIM_INFINITY and self.hard < self.need:
            pytest.skip(f"needs {self.need} open files, the hard limit is {self.hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.hard, self.hard))

    def __exit__(self, *exc) -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.soft, self.hard))


def open_counts(
    socks: list[tuple[int, socket.socket]], settle: float, at_most: int | None = None
) -> dict[int, int]:
    """Reads every socket (epoll: fds exceed 1024) until none has been closed by the server
    for `settle` seconds, and at most `at_most` are open (or 60 s have passed: a busy machine
    may accept slowly); drops the closed ones from `socks` and returns how many are open per
    attacker index."""
    deadline = time.monotonic() + 60
    with selectors.DefaultSelector() as sel:
        for n, (a, s) in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, n)
        closed = set()
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and (
            time.monotonic() - quiet_since < settle
            or (at_most is not None and len(socks) - len(closed) > at_most)
        ):
            for key, _ in sel.select(0.1):
                n = key.data
                try:
                    chunk = socks[n][1].recv(4096)
                except BlockingIOError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    chunk = b""
                assert not chunk, f"an idle socket was answered: {chunk!r}"
                closed.add(n)
                sel.unregister(socks[n][1])
                quiet_since = time.monotonic()
    for n in sorted(closed, reverse=True):
        socks.pop(n)[1].close()
    counts: dict[int, int] = {}
    for a, _ in socks:
        counts[a] = counts.get(a, 0) + 1
    return counts


async def time_to_welcome(server: Server, i: int) -> float:
    token = mint(f"good{i}")
    t0 = time.monotonic()
    ws = await open_ws(server, "shop", token, local_addr=(good_addr(i), 0))
    _, welcome = await recv_json(ws)
    took = time.monotonic() - t0
    assert welcome["type"] == "welcome", welcome
    await ws.close()
    return took


@pytest.mark.parametrize("cap", [10_000, 400], ids=["default-cap", "cap-below-the-attack"])
def test_idle_sockets_from_ten_addresses_lock_no_one_out(servers, cap):
    # cap 10,000: the shipped limits (the attack's 11,000 sockets exceed the node cap, as they
    # do in the field); cap 400: below what ten addresses may hold (640), so the node cap is
    # reached and the oldest handshakes make room.
    limits = {**DEFAULT_LIMITS, "max_pending_handshakes": cap}
    with OpenFiles(ATTACK_ADDRS * PER_ADDR + 1000):
        # The idle sockets must outlive the test rather than meet their deadline.
        server = servers.start(config=cfg(limits, handshake_timeout_ms=120_000))
        socks: list[tuple[int, socket.socket]] = []
        try:
            for _ in range(PER_ADDR):
                for a in range(ATTACK_ADDRS):
                    socks.append((a, raw_connect(server, attacker(a))))
            per_ip = DEFAULT_LIMITS["max_pending_handshakes_per_ip"]
            held = open_counts(socks, settle=1.0, at_most=min(cap, ATTACK_ADDRS * per_ip))
            print(f"cap {cap}: {sum(held.values())} idle sockets held, per address {held}")
            assert all(n <= per_ip for n in held.values()), held
            assert sum(held.values()) <= min(cap, ATTACK_ADDRS * per_ip), held
            if cap > ATTACK_ADDRS * per_ip:
                # Nothing to evict: each address holds exactly its bound, the rest is closed.
                assert held == {a: per_ip for a in range(ATTACK_ADDRS)}, held
            # While the attack holds, others connect at once.
            async def goods() -> list[float]:
                return await asyncio.gather(
                    *(time_to_welcome(server, i) for i in range(GOOD_CLIENTS))
                )

            took = run(goods())
            print(f"cap {cap}: welcome after {max(took):.3f}s at most")
            assert max(took) < WELCOME_WITHIN, took
            hs = stats(server)["handshakes"]
            assert hs["accepted"] == GOOD_CLIENTS, hs
            if cap < ATTACK_ADDRS * per_ip:
                assert hs["evicted"] >= ATTACK_ADDRS * per_ip - cap, hs
            else:
                assert hs["evicted"] == 0, hs
            # Every attack socket the server closed is counted: at accept or evicted.
            closed = ATTACK_ADDRS * PER_ADDR - sum(open_counts(socks, settle=0.5).values())
            assert hs["rate_limited"] + hs["evicted"] == closed, (hs, closed)
        finally:
            for _, s in socks:
                s.close()
            server.stop()
            server.stopped_by_test = True


#: Malformed requests sent from one address.
BAD_REQUESTS = 3000
GARBAGE = b"\x16\x03\x01 not HTTP at all\r\n\r\n"


async def send_garbage(server: Server, src: str, gate: asyncio.Semaphore) -> int:
    """One malformed request; the answer's status (0 = closed without an answer)."""
    host, port = server.listen.rsplit(":", 1)
    async with gate:
        reader, writer = await asyncio.open_connection(host, int(port), local_addr=(src, 0))
        writer.write(GARBAGE)
        try:
            data = await asyncio.wait_for(reader.read(), 10)
        except ConnectionResetError:
            data = b""
        writer.close()
    m = re.match(rb"HTTP/1\.1 (\d{3}) ", data)
    return int(m.group(1)) if m else 0


def test_refusal_flood_is_rate_limited_and_logged_as_a_summary(servers, monkeypatch):
    monkeypatch.delenv("RUST_LOG", raising=False)
    limits = {**DEFAULT_LIMITS, "handshakes_per_ip_per_sec": 20, "handshake_burst_per_ip": 50}
    server = servers.start(config=config_toml(limits=limits))
    shards = 2

    async def flood() -> tuple[list[int], float]:
        # Fewer in flight than the address may hold in handshake: each is answered.
        gate = asyncio.Semaphore(32)
        t0 = time.monotonic()
        statuses = await asyncio.gather(
            *(send_garbage(server, attacker(0), gate) for _ in range(BAD_REQUESTS))
        )
        return statuses, time.monotonic() - t0

    statuses, elapsed = run(flood(), timeout=120)
    bad, limited = statuses.count(400), statuses.count(429)
    print(f"{BAD_REQUESTS} malformed requests in {elapsed:.1f}s: {bad} x 400, {limited} x 429")
    assert bad + limited == BAD_REQUESTS, sorted(set(statuses))
    # Malformed requests take handshake tokens like any other: past the per-shard burst and
    # what refilled, the answer is 429.
    assert bad <= shards * (50 + 20 * (elapsed + 1)), (bad, elapsed)
    server.stop()
    server.stopped_by_test = True
    text = server.stderr_path.read_text(errors="replace")
    full = [ln for ln in text.splitlines() if "handshake refused" in ln]
    summaries = [ln for ln in text.splitlines() if "handshakes refused and not logged" in ln]
    # One line in full per shard and interval (10 s), then one summary each.
    intervals = int(elapsed // 10) + 1
    assert len(full) <= shards * intervals, full
    assert 1 <= len(summaries) <= shards * intervals, text[-3000:]
    more = sum(int(re.search(r"more=(\d+)", ln).group(1)) for ln in summaries)
    assert len(full) + more == BAD_REQUESTS, (len(full), more, summaries)
    by_reason = {"bad_request": 0, "rate_limited": 0}
    for ln in summaries:
        for reason, n in re.findall(r"(\w+):(\d+)", ln.split("reasons=", 1)[1]):
            by_reason[reason] = by_reason.get(reason, 0) + int(n)
    for ln in full:
        by_reason["bad_request" if "status=400" in ln else "rate_limited"] += 1
    assert by_reason == {"bad_request": bad, "rate_limited": limited}, (by_reason, summaries)
