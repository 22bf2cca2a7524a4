"""The hostile-input suite (protection): attacks against the real binary.

For every scenario three things are asserted:

(a) the contract's answer to the attack: the exact HTTP status or close code (or, where the
    contract says "dropped", that the server closes the TCP connection in time);
(b) well-behaved clients, connected from another loopback address, receive *every* message
    published over the HTTP API while the attack runs: exactly `{"seq": 1..N}` in order;
(c) the server's resident memory (VmRSS of the real process) stays below a stated bound over
    a baseline taken once the good clients are connected.

Attackers bind 127.0.0.2 and up; good clients use 127.0.0.1 (loopback holds all of 127/8),
so the per-address limits of one never touch the other.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import selectors
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

from herald_client import (
    ADMIN_KEY,
    Server,
    apublish,
    assert_error_body,
    config_toml,
    expect_close,
    http_request,
    mint,
    open_ws,
    recv_json,
    run,
)

# --------------------------------------------------------------------------------------------
# Bounds
# --------------------------------------------------------------------------------------------
#
# RSS growth over the baseline (VmRSS once the good clients are connected; debug build, 2
# shards, mimalloc; baseline ~29 MiB). Measured on the 2-core dev box, peak - baseline:
#   handshake flood (200 upgrades, ~20 admitted):                +0.3 to +0.4 MiB
#   1000 half-open handshakes:                                   +1.2 MiB (~1.2 KiB a socket)
#   max_pending_handshakes=100 with 300 sockets:                 +0.2 to +0.3 MiB
#   connections_per_ip, slow-loris, frame trickle, oversized,
#   50 x invalid JSON, bad requests, message flood:              +0.1 to +0.3 MiB
#   stalled reader (64 KiB broadcasts, 256 KiB queue cap):       +0.8 MiB, and it stays there
#                                                                (allocator keeps its pages)
# The bounds leave >10x margin over that, yet stay far below what a leak costs: 1000 half-open
# sockets each keeping a 64 KiB buffer would add 62.5 MiB; keeping the ~100 x 64 KiB
# publications of the stalled-reader test alive would add 6+ MiB.

#: Peak RSS growth allowed during any attack, KiB.
RSS_ATTACK_BOUND_KIB = 16 * 1024
#: RSS growth allowed once the stalled reader is gone (its queue must be given back), KiB.
RSS_AFTER_STALL_BOUND_KIB = 4 * 1024

#: Good clients per scenario (from GOOD_ADDR; all subscribed to broadcast, topic `all`).
GOOD_CLIENTS = 4
GOOD_ADDR = "127.0.0.1"
#: Pause between two publications during an attack, seconds.
PUBLISH_INTERVAL = 0.02
#: Fewest messages published during any attack.
MIN_PUBLISHED = 20
#: Seconds a good client may take to receive everything once the attack is over.
DELIVERY_TIMEOUT = 15.0
#: Slack on any "closed within" deadline: sweep tick (<= 1 s) plus a noisy 2-core machine.
SLACK = 5.0

WS_KEY = "dGhlIHNhbXBsZSBub25jZQ=="


def attacker(i: int) -> str:
    """Attacker source addresses: 127.0.0.2, .3, .4, .5, ..."""
    return f"127.0.0.{2 + i}"


def cfg(limits: dict[str, int] | None = None, **ws: int) -> str:
    """The suite's config with `[ws]` keys set (replaced when the base already has them)."""
    text = config_toml(limits=limits)
    head, sep, rest = text.partition("[ws]\n")
    assert sep, text
    body, sep2, tail = rest.partition("\n[")
    lines = [ln for ln in body.splitlines() if ln.split("=")[0].strip() not in ws]
    lines += [f"{k} = {v}" for k, v in ws.items()]
    return head + "[ws]\n" + "\n".join(lines) + "\n" + sep2 + tail


# --------------------------------------------------------------------------------------------
# Memory
# --------------------------------------------------------------------------------------------


def rss_kib(server: Server) -> int:
    with open(f"/proc/{server.proc.pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/<pid>/status")


class RssWatch:
    """Samples the server's VmRSS every 20 ms in a thread from the baseline on; keeps the peak."""

    def __init__(self, server: Server, name: str):
        self.server = server
        self.name = name
        self.baseline = rss_kib(server)
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_kib(self.server))
            except (OSError, AssertionError):
                return
            self._stop.wait(0.02)

    def check(self, bound_kib: int = RSS_ATTACK_BOUND_KIB) -> int:
        """Stops sampling; asserts peak - baseline < bound; returns the growth."""
        self._stop.set()
        self._thread.join(timeout=2)
        self.peak = max(self.peak, rss_kib(self.server))
        growth = self.peak - self.baseline
        print(f"RSS {self.name}: baseline {self.baseline} KiB, peak {self.peak} KiB, +{growth} KiB")
        assert growth < bound_kib, (
            f"{self.name}: RSS grew by {growth} KiB (baseline {self.baseline} KiB, peak "
            f"{self.peak} KiB), bound {bound_kib} KiB"
        )
        return growth


# --------------------------------------------------------------------------------------------
# Good clients: everything published during the attack must reach every one of them
# --------------------------------------------------------------------------------------------


class Goods:
    """`n` clients from `addr`, each with a reader task recording every frame it gets."""

    def __init__(self, server: Server, n: int = GOOD_CLIENTS, addr: str = GOOD_ADDR):
        self.server = server
        self.n = n
        self.addr = addr
        self.conns: list[ClientConnection] = []
        self.frames: list[list[Any]] = []
        self.closed: list[Any] = []
        self.tasks: list[asyncio.Task] = []
        self.published = 0

    async def connect(self) -> Goods:
        for i in range(self.n):
            ws = await open_ws(
                self.server, "shop", mint(f"good{i}"), local_addr=(self.addr, 0), max_size=None
            )
            _, welcome = await recv_json(ws)
            assert welcome.get("type") == "welcome", welcome
            self.conns.append(ws)
            self.frames.append([])
            self.closed.append(None)
            self.tasks.append(asyncio.create_task(self._read(i, ws)))
        return self

    async def _read(self, i: int, ws: ClientConnection) -> None:
        try:
            async for raw in ws:
                self.frames[i].append(json.loads(raw))
        except ConnectionClosed as e:
            self.closed[i] = e
            return
        self.closed[i] = "closed normally"

    async def publish_during(
        self, attack: Any, *, pad: int = 0, min_msgs: int = MIN_PUBLISHED
    ) -> Any:
        """Runs `attack` (a coroutine) while publishing `{"seq": i}` to `all`, numbered from
        where the last call stopped, every PUBLISH_INTERVAL until the attack is over and at
        least `min_msgs` went out. Returns the attack's result."""
        task = asyncio.ensure_future(attack)
        sent = 0
        while not task.done() or sent < min_msgs:
            self.published += 1
            sent += 1
            body = {"project": "shop", "topic": "all", "data": self.data(self.published, pad)}
            await apublish(self.server, body)
            await asyncio.sleep(PUBLISH_INTERVAL)
        return await task

    @staticmethod
    def data(seq: int, pad: int = 0) -> dict:
        return {"seq": seq, "pad": "x" * pad} if pad else {"seq": seq}

    async def check(self, pad: int = 0) -> None:
        """Every good client got exactly seq 1..published on `all`, in order, and nothing else,
        and is still open."""
        n = self.published
        assert n >= MIN_PUBLISHED
        deadline = time.monotonic() + DELIVERY_TIMEOUT
        while any(len(f) < n for f in self.frames) and time.monotonic() < deadline:
            if any(c is not None for c in self.closed):
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.2)  # anything extra would arrive now
        for i, frames in enumerate(self.frames):
            assert self.closed[i] is None, f"good client {i} was closed: {self.closed[i]!r}"
            seqs = [f.get("data", {}).get("seq") for f in frames]
            assert seqs == list(range(1, n + 1)), (
                f"good client {i} got {len(frames)} of {n} messages: seqs {seqs}"
            )
            for f in frames:
                assert f["type"] == "message" and f["topic"] == "all", {**f, "data": "..."}
                assert f["data"] == self.data(f["data"]["seq"], pad), f"good client {i}: bad data"

    async def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        await asyncio.gather(*(ws.close() for ws in self.conns), return_exceptions=True)


# --------------------------------------------------------------------------------------------
# Raw sockets
# --------------------------------------------------------------------------------------------


def upgrade_request(token: str | None, project: str = "shop") -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"GET /ws/{project} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
        f"{auth}\r\n"
    ).encode()


def raw_connect(
    server: Server, src: str, rcvbuf: int | None = None, timeout: float = 10
) -> socket.socket:
    host, port = server.listen.rsplit(":", 1)
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((src, 0))
    s.settimeout(timeout)
    s.connect((host, int(port)))
    return s


def parse_http(buf: bytes) -> tuple[int, dict[str, str], bytes, bytes] | None:
    """(status, lower-cased headers, body, rest) once a whole response is in `buf`."""
    head, sep, rest = buf.partition(b"\r\n\r\n")
    if not sep:
        return None
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for ln in lines[1:]:
        k, _, v = ln.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    if len(rest) < length:
        return None
    return status, headers, rest[:length], rest[length:]


def raw_ws(
    server: Server, src: str, token: str, rcvbuf: int | None = None
) -> tuple[socket.socket, bytes]:
    """A raw socket after a successful upgrade; returns it and the bytes read past the 101."""
    s = raw_connect(server, src, rcvbuf)
    s.sendall(upgrade_request(token))
    buf = b""
    while (r := parse_http(buf)) is None:
        chunk = s.recv(65536)
        assert chunk, f"EOF during the upgrade; got {buf!r}"
        buf += chunk
    status, _, body, rest = r
    assert status == 101, (status, body)
    return s, rest


def parse_frame(buf: bytes) -> tuple[int, bytes, bytes] | None:
    """(opcode, payload, rest) of the first whole (unmasked) server frame in `buf`."""
    if len(buf) < 2:
        return None
    op, n, off = buf[0] & 0x0F, buf[1] & 0x7F, 2
    assert not buf[1] & 0x80, "server frames are never masked"
    if n == 126:
        if len(buf) < 4:
            return None
        n, off = struct.unpack(">H", buf[2:4])[0], 4
    elif n == 127:
        if len(buf) < 10:
            return None
        n, off = struct.unpack(">Q", buf[2:10])[0], 10
    if len(buf) < off + n:
        return None
    return op, buf[off : off + n], buf[off + n :]


def read_frame(s: socket.socket, buf: bytes, timeout: float = 5) -> tuple[int, bytes, bytes]:
    deadline = time.monotonic() + timeout
    while (f := parse_frame(buf)) is None:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(65536)
        assert chunk, f"EOF before a whole frame; have {buf[:200]!r}"
        buf += chunk
    return f


def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    """A masked client frame (mask of zeros, so the payload goes as is)."""
    b0 = (0x80 if fin else 0) | opcode
    n = len(payload)
    if n < 126:
        head = struct.pack(">BB", b0, 0x80 | n)
    elif n < 1 << 16:
        head = struct.pack(">BBH", b0, 0x80 | 126, n)
    else:
        head = struct.pack(">BBQ", b0, 0x80 | 127, n)
    return head + b"\0\0\0\0" + payload


def close_code(payload: bytes) -> int:
    assert len(payload) >= 2, payload
    return struct.unpack(">H", payload[:2])[0]


def is_closed(s: socket.socket) -> bool:
    """True once the server has closed `s` (EOF or reset); reads and drops anything pending."""
    s.setblocking(False)
    try:
        while True:
            try:
                chunk = s.recv(65536)
            except BlockingIOError:
                return False
            except (ConnectionResetError, BrokenPipeError):
                return True
            if not chunk:
                return True
    finally:
        s.setblocking(True)


def wait_all_closed(socks: list[socket.socket], timeout: float) -> dict[int, float]:
    """Waits (epoll: fds exceed 1024) until the server closes every socket or `timeout`
    passes; returns {index: seconds after the call when it was seen closed}."""
    t0 = time.monotonic()
    closed: dict[int, float] = {}
    with selectors.DefaultSelector() as sel:
        for i, s in enumerate(socks):
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, i)
        while len(closed) < len(socks):
            left = t0 + timeout - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 0.5)):
                i = key.data
                try:
                    chunk = socks[i].recv(65536)
                except BlockingIOError:
                    continue
                except (ConnectionResetError, BrokenPipeError):
                    chunk = b""
                if not chunk:
                    closed[i] = time.monotonic() - t0
                    sel.unregister(socks[i])
    return closed


def open_half_open(server: Server, n: int, addrs: int = 4) -> list[socket.socket]:
    """`n` sockets from attacker addresses, each with a partial upgrade request (no blank line)."""
    socks = []
    try:
        for i in range(n):
            s = raw_connect(server, attacker(i % addrs))
            socks.append(s)
            s.sendall(b"GET /ws/shop HTTP/1.1\r\nHost: x\r\n")
    except BaseException:
        close_socks(socks)
        raise
    return socks


def close_socks(socks: list[socket.socket]) -> None:
    for s in socks:
        try:
            s.close()
        except OSError:
            pass


def stats(server: Server) -> dict:
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    r = http_request("GET", f"{server.api_url}/api/v1/stats", None, auth)
    assert r.status == 200, r
    return r.json()


def listed(server: Server, user: str) -> list:
    r = http_request(
        "GET",
        f"{server.api_url}/api/v1/connections?project=shop&user={user}",
        None,
        {"Authorization": f"Bearer {ADMIN_KEY}"},
    )
    assert r.status == 200, r
    return r.json()["connections"]


class Scene:
    """One attack: the good clients, the RSS watch, and what the attacker opened (closed at the
    end whatever happens)."""

    def __init__(self, goods: Goods, rss: RssWatch):
        self.goods = goods
        self.rss = rss
        self.socks: list[socket.socket] = []
        #: websockets connections or asyncio stream writers.
        self.conns: list[Any] = []


@contextlib.asynccontextmanager
async def attacked(
    server: Server, name: str, n: int = GOOD_CLIENTS, verify: bool = True
) -> AsyncIterator[Scene]:
    """Connects `n` good clients and starts watching RSS; on leaving the block, asserts (b) and
    (c) (unless `verify` is False: the test does it itself) and closes everything."""
    goods = await Goods(server, n).connect()
    await asyncio.sleep(0.2)
    sc = Scene(goods, RssWatch(server, name))
    try:
        yield sc
        if verify:
            await goods.check()
            sc.rss.check()
    finally:
        close_socks(sc.socks)
        for c in sc.conns:
            closing = c.close()
            if asyncio.iscoroutine(closing):
                await asyncio.gather(closing, return_exceptions=True)
        await goods.close()


# --------------------------------------------------------------------------------------------
# 1. A flood of handshakes from one address
# --------------------------------------------------------------------------------------------

FLOOD_RATE, FLOOD_BURST, FLOOD_ATTEMPTS = 5, 10, 200


async def one_upgrade(server: Server, src: str, token: str) -> tuple[int, dict, bytes, Any]:
    host, port = server.listen.rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port), local_addr=(src, 0))
    writer.write(upgrade_request(token))
    buf = b""
    while (r := parse_http(buf)) is None:
        chunk = await asyncio.wait_for(reader.read(65536), 10)
        assert chunk, f"EOF before a whole response: {buf!r}"
        buf += chunk
    status, headers, body, _ = r
    if status != 101:
        writer.close()
        writer = None
    return status, headers, body, writer


def test_handshake_flood_from_one_address_is_rate_limited(servers):
    # Every attempt is in handshake at once: the per-address bound on those must not close
    # any unread here (tests/py/test_admission.py tests it).
    limits = {
        "handshakes_per_ip_per_sec": FLOOD_RATE,
        "handshake_burst_per_ip": FLOOD_BURST,
        "max_pending_handshakes_per_ip": FLOOD_ATTEMPTS,
    }
    server = servers.start(config=cfg(limits))
    shards = 2

    async def go():
        async with attacked(server, "handshake flood") as sc:
            async def flood():
                token = mint("flooder")
                t0 = time.monotonic()
                results = await asyncio.gather(
                    *(one_upgrade(server, attacker(0), token) for _ in range(FLOOD_ATTEMPTS))
                )
                return results, time.monotonic() - t0

            results, elapsed = await sc.goods.publish_during(flood())
            sc.conns += [w for *_, w in results if w is not None]
            statuses = [st for st, *_ in results]
            ok = statuses.count(101)
            limited = [(h, b) for st, h, b, _ in results if st == 429]
            assert ok + len(limited) == FLOOD_ATTEMPTS, sorted(set(statuses))
            # Per-shard buckets: at most burst per shard, plus what refilled while it ran.
            most = shards * (FLOOD_BURST + FLOOD_RATE * (elapsed + 1))
            print(f"handshake flood: {ok} admitted, {len(limited)} x 429 in {elapsed:.2f}s")
            assert FLOOD_BURST <= ok <= most, (ok, elapsed)
            assert len(limited) >= FLOOD_ATTEMPTS - most
            for headers, body in limited:
                assert_error_body(body, "rate_limited")
                assert int(headers["retry-after"]) >= 1, headers
            # A good client from another address still gets in, and everyone got everything.
            late = Goods(server, 1)
            await late.connect()
            await late.close()

    run(go())


# --------------------------------------------------------------------------------------------
# 2. A thousand half-open handshakes
# --------------------------------------------------------------------------------------------

HALF_OPEN = 1000
HANDSHAKE_TIMEOUT_MS = 1500


def test_thousand_half_open_handshakes_are_dropped_at_the_deadline(servers):
    server = servers.start(config=cfg(handshake_timeout_ms=HANDSHAKE_TIMEOUT_MS))

    async def go():
        async with attacked(server, f"{HALF_OPEN} half-open handshakes") as sc:
            def attack():
                t0 = time.monotonic()
                sc.socks.extend(open_half_open(server, HALF_OPEN))
                opened = time.monotonic() - t0
                closed = wait_all_closed(sc.socks, opened + HANDSHAKE_TIMEOUT_MS / 1000 + SLACK)
                return opened, closed

            opened, closed = await sc.goods.publish_during(asyncio.to_thread(attack))
            budget = opened + HANDSHAKE_TIMEOUT_MS / 1000 + SLACK
            assert len(closed) == HALF_OPEN, (
                f"{HALF_OPEN - len(closed)} of {HALF_OPEN} half-open sockets still open "
                f"{budget:.1f}s after the first connect"
            )
            last = max(closed.values())
            print(f"half-open: opened in {opened:.2f}s, last closed after {last:.2f}s")

    run(go())


def test_pending_handshake_cap_evicts_the_oldest_for_newcomers(servers):
    cap, n = 100, 300
    server = servers.start(
        config=cfg({"max_pending_handshakes": cap}, handshake_timeout_ms=3000)
    )

    async def go():
        async with attacked(server, f"max_pending_handshakes={cap}, {n} half-open") as sc:
            def attack():
                sc.socks.extend(open_half_open(server, n))
                time.sleep(1.0)
                return [i for i, s in enumerate(sc.socks) if not is_closed(s)]

            still_open = await sc.goods.publish_during(asyncio.to_thread(attack))
            # The cap is split evenly over the 2 shards (50 each); a shard that got fewer than
            # 50 holds fewer. Slack of 2 for rounding of the split.
            assert len(still_open) <= cap + 2, f"{len(still_open)} of {n} still open"
            assert len(still_open) >= cap // 2, f"only {len(still_open)} of {n} held open"
            # The oldest made room for the newest: what is held came last (each shard keeps
            # the newest of its share).
            assert min(still_open) >= n - 2 * cap, still_open
            # At the cap a newcomer is still served: it evicts the oldest.
            late = await Goods(server, 1).connect()
            await late.close()
            assert stats(server)["handshakes"]["evicted"] >= n - cap - 2

    run(go())


def test_connections_per_ip_refuses_the_fourth_with_429(servers):
    server = servers.start(config=cfg({"connections_per_ip": 3}))

    async def go():
        async with attacked(server, "connections_per_ip=3", n=3) as sc:
            async def attack():
                for i in range(3):
                    ws = await open_ws(server, "shop", mint(f"a{i}"), local_addr=(attacker(0), 0))
                    sc.conns.append(ws)
                    _, welcome = await recv_json(ws)
                    assert welcome["type"] == "welcome", welcome
                try:
                    ws = await open_ws(server, "shop", mint("a3"), local_addr=(attacker(0), 0))
                except InvalidStatus as e:
                    r = e.response
                    assert r.status_code == 429, (r.status_code, bytes(r.body))
                    assert_error_body(bytes(r.body), "rate_limited")
                    assert int(r.headers["Retry-After"]) >= 1, r.headers
                else:
                    sc.conns.append(ws)
                    raise AssertionError("4th concurrent connection from one address accepted")
                # Another address is still fine.
                other = await open_ws(server, "shop", mint("b0"), local_addr=(attacker(1), 0))
                sc.conns.append(other)
                _, welcome = await recv_json(other)
                assert welcome["type"] == "welcome", welcome
                # One of the three leaves: the address may connect again.
                await sc.conns.pop(0).close()
                deadline = time.monotonic() + SLACK
                while True:
                    try:
                        ws = await open_ws(server, "shop", mint("a4"), local_addr=(attacker(0), 0))
                        sc.conns.append(ws)
                        break
                    except InvalidStatus:
                        assert time.monotonic() < deadline, "address still refused after a close"
                        await asyncio.sleep(0.2)

            await sc.goods.publish_during(attack())

    run(go())


# --------------------------------------------------------------------------------------------
# 3. A peer sending one byte per second
# --------------------------------------------------------------------------------------------

TRICKLERS = 5


def trickle(s: socket.socket, data: bytes, limit: float, interval: float = 1.0) -> float | None:
    """Sends `data` one byte per `interval`; returns the seconds until the server closed `s`,
    or None if it was still open after `limit` seconds."""
    t0 = time.monotonic()
    for b in data:
        if time.monotonic() - t0 > limit:
            return None
        try:
            s.send(bytes([b]))
        except (BrokenPipeError, ConnectionResetError):
            return time.monotonic() - t0
        end = time.monotonic() + interval
        while time.monotonic() < end:
            if is_closed(s):
                return time.monotonic() - t0
            time.sleep(0.05)
    return None


def test_slow_loris_handshake_is_dropped_at_the_deadline(servers):
    server = servers.start(config=cfg(handshake_timeout_ms=HANDSHAKE_TIMEOUT_MS))
    timeout = HANDSHAKE_TIMEOUT_MS / 1000

    async def go():
        async with attacked(server, "slow-loris handshake") as sc:
            def one(i: int) -> float | None:
                s = raw_connect(server, attacker(i % 4))
                sc.socks.append(s)
                return trickle(s, upgrade_request(mint("slow")), timeout + SLACK)

            async def attack():
                return await asyncio.gather(*(asyncio.to_thread(one, i) for i in range(TRICKLERS)))

            times = await sc.goods.publish_during(attack())
            for t in times:
                assert t is not None, f"a trickled handshake still open after {timeout + SLACK}s"
                # The deadline counts from accept, which is after the client's connect.
                assert 0.8 * timeout <= t <= timeout + SLACK, times

    run(go())


HEARTBEAT_MS = 1000


def test_frame_trickled_one_byte_per_second_is_dropped_by_the_heartbeat(servers):
    server = servers.start(config=cfg(heartbeat_interval_ms=HEARTBEAT_MS))
    hb = HEARTBEAT_MS / 1000
    # A ping every interval; a peer that completed nothing (no pong, no frame) between two
    # pings is dropped: at most ~2 intervals after its last complete frame, plus sweep slack.
    limit = 3 * hb + SLACK

    async def go():
        async with attacked(server, "frame trickle") as sc:
            def one(i: int) -> float | None:
                s, rest = raw_ws(server, attacker(i % 4), mint(f"slow{i}"))
                sc.socks.append(s)
                op, payload, _ = read_frame(s, rest)
                assert op == 1 and json.loads(payload)["type"] == "welcome", payload
                frame = client_frame(1, json.dumps({"op": "ping", "id": "x" * 100}).encode())
                return trickle(s, frame, limit)

            async def attack():
                return await asyncio.gather(*(asyncio.to_thread(one, i) for i in range(TRICKLERS)))

            times = await sc.goods.publish_during(attack())
            assert all(t is not None for t in times), (
                f"peers trickling one frame byte per second still open after {limit}s "
                f"(heartbeat {hb}s): {times}"
            )

    run(go())


# --------------------------------------------------------------------------------------------
# 4. Oversized frames
# --------------------------------------------------------------------------------------------

MAX_MESSAGE = 65536  # ws.max_message_bytes of config_toml


def test_oversized_frames_close_1009(servers):
    server = servers.start(config=cfg())

    async def go():
        async with attacked(server, "oversized frames") as sc:
            async def attack():
                # A whole text frame one byte over the limit.
                ws = await open_ws(server, "shop", mint("big"), local_addr=(attacker(0), 0))
                await recv_json(ws)
                try:
                    await ws.send(json.dumps({"op": "ping", "id": "x" * MAX_MESSAGE}))
                except ConnectionClosed:
                    pass
                await expect_close_soon(ws, 1009)

                # A header announcing 2^40 bytes, and no body: 1009 at once.
                def huge():
                    s, rest = raw_ws(server, attacker(1), mint("huge"))
                    try:
                        op, _, rest = read_frame(s, rest)
                        assert op == 1
                        s.sendall(struct.pack(">BBQ", 0x81, 0x80 | 127, 1 << 40) + b"\0\0\0\0")
                        t0 = time.monotonic()
                        op, payload, _ = read_frame(s, rest, timeout=SLACK)
                        assert op == 8, (op, payload)
                        assert close_code(payload) == 1009, payload
                        assert time.monotonic() - t0 < SLACK
                        s.settimeout(SLACK)
                        assert s.recv(1) == b"", "socket left open after 1009"
                    finally:
                        s.close()

                await asyncio.to_thread(huge)

            await sc.goods.publish_during(attack())

    run(go())


# --------------------------------------------------------------------------------------------
# 5. Invalid JSON storms, bad requests, message floods
# --------------------------------------------------------------------------------------------

INVALID_JSON_CONNS = 50
MAX_BAD_REQUESTS = 5


#: herald waits CLOSE_GRACE (5 s) for the peer's answer to its close frame; a close that
#: completes within this many seconds did not wait for it (well below 5 s, well above the
#: milliseconds it takes on loopback).
CLOSE_SOON = 3.0


async def expect_close_soon(ws: ClientConnection, code: int) -> list:
    """The server's close frame with `code` and the end of the closing handshake (websockets
    reports the close once the TCP connection is gone), within CLOSE_SOON seconds: the
    server must see the client's close answer even when the client had pipelined more
    frames after the one that made the server close."""
    try:
        return await expect_close(ws, code, timeout=CLOSE_SOON)
    except AssertionError as e:
        rcvd = ws.protocol.close_rcvd
        if rcvd is not None and rcvd.code == code:
            raise AssertionError(
                f"the server's close frame ({rcvd.code} {rcvd.reason!r}) arrived, and the client "
                f"answered it, but the server kept the TCP connection open for over "
                f"{CLOSE_SOON}s: it did not take the client's close answer, which came after "
                f"frames the client had pipelined behind the one that made the server close"
            ) from None
        raise AssertionError(f"{e} (close frame received: {rcvd!r})") from None


async def attacker_ws(server: Server, i: int, sub: str) -> ClientConnection:
    ws = await open_ws(server, "shop", mint(sub), local_addr=(attacker(i % 4), 0))
    _, welcome = await recv_json(ws)
    assert welcome["type"] == "welcome", welcome
    return ws


def test_invalid_json_storm_closes_each_with_1007(servers):
    server = servers.start(config=cfg())

    async def go():
        async with attacked(server, f"invalid JSON x{INVALID_JSON_CONNS}") as sc:
            async def attack():
                sc.conns.extend(
                    await asyncio.gather(
                        *(attacker_ws(server, i, f"junk{i}") for i in range(INVALID_JSON_CONNS))
                    )
                )
                await asyncio.gather(*(ws.send('{"op": "ping", ') for ws in sc.conns))
                await asyncio.gather(*(expect_close_soon(ws, 1007) for ws in sc.conns))

            await sc.goods.publish_during(attack())

    run(go())


def test_repeated_bad_requests_close_1008(servers):
    server = servers.start(config=cfg(max_bad_requests=MAX_BAD_REQUESTS))

    async def go():
        async with attacked(server, "bad requests") as sc:
            async def attack():
                ws = await attacker_ws(server, 0, "bad")
                for i in range(3 * MAX_BAD_REQUESTS):
                    try:
                        await ws.send(json.dumps({"op": "no-such-op", "id": i}))
                    except ConnectionClosed:
                        break
                before = await expect_close_soon(ws, 1008)
                # Replies still queued when the close starts are dropped (docs/protocol.md).
                # (The attacker is a shop client too: it also gets the broadcasts.)
                errors = [f for f in map(json.loads, before) if f["type"] != "message"]
                assert len(errors) <= MAX_BAD_REQUESTS + 1, errors
                for i, e in enumerate(errors):
                    assert e["type"] == "error" and e["code"] == "bad_request" and e["id"] == i, e

                # The same, all pipelined in one write (so the server reads them at once and
                # frames follow the one that makes it close), on a raw socket: close frame
                # 1008, then our close answer must end the connection at once.
                def pipelined():
                    s, rest = raw_ws(server, attacker(1), mint("bad2"))
                    try:
                        burst = b"".join(
                            client_frame(1, json.dumps({"op": "no-such-op", "id": i}).encode())
                            for i in range(3 * MAX_BAD_REQUESTS)
                        )
                        s.sendall(burst)
                        while True:
                            op, payload, rest = read_frame(s, rest)
                            if op == 8:
                                break
                            assert op == 1, (op, payload)
                            f = json.loads(payload)
                            assert f["type"] in ("welcome", "message", "error"), f
                        assert close_code(payload) == 1008, payload
                        s.sendall(client_frame(8, payload[:2]))
                        t0 = time.monotonic()
                        s.settimeout(5 + SLACK)
                        try:
                            while s.recv(65536):
                                pass
                        except ConnectionResetError:
                            pass
                        waited = time.monotonic() - t0
                        assert waited < CLOSE_SOON, (
                            f"the server held the socket {waited:.1f}s after our close answer "
                            f"(it did not see the answer behind the pipelined frames)"
                        )
                    finally:
                        s.close()

                await asyncio.to_thread(pipelined)

            await sc.goods.publish_during(attack())

    run(go())


MSG_RATE, MSG_BURST, MSG_FLOOD = 10, 20, 100


def test_message_flood_closes_4029(servers):
    limits = {"messages_per_conn_per_sec": MSG_RATE, "message_burst_per_conn": MSG_BURST}
    server = servers.start(config=cfg(limits))

    async def go():
        async with attacked(server, "message flood") as sc:
            async def attack():
                ws = await attacker_ws(server, 0, "flood")
                t0 = time.monotonic()
                for i in range(MSG_FLOOD):
                    try:
                        await ws.send(json.dumps({"op": "ping", "id": i}))
                    except ConnectionClosed:
                        break
                before = await expect_close_soon(ws, 4029)
                elapsed = time.monotonic() - t0
                pongs = [f for f in map(json.loads, before) if f["type"] != "message"]
                assert pongs == [{"type": "pong", "id": i} for i in range(len(pongs))], pongs
                # The burst, plus what refilled while the flood ran; far fewer than sent.
                assert MSG_BURST <= len(pongs) <= MSG_BURST + MSG_RATE * (elapsed + 1), (
                    len(pongs),
                    elapsed,
                )

            await sc.goods.publish_during(attack())

    run(go())


# --------------------------------------------------------------------------------------------
# 6. A reader that never reads
# --------------------------------------------------------------------------------------------

QUEUE_CAP = 262144
BIG = 64 * 1024
MAX_BIG_MESSAGES = 400
AFTER_STALL_MESSAGES = 50


def test_reader_that_never_reads_is_closed_4008(servers):
    server = servers.start(config=cfg(max_outbound_queue_bytes=QUEUE_CAP))

    async def go():
        async with attacked(server, "stalled reader", verify=False) as sc:
            s, rest = await asyncio.to_thread(raw_ws, server, attacker(0), mint("stalled"), 4096)
            sc.socks.append(s)
            op, payload, rest = await asyncio.to_thread(read_frame, s, rest)
            assert op == 1 and json.loads(payload)["type"] == "welcome", payload
            assert len(await asyncio.to_thread(listed, server, "stalled")) == 1

            async def until_dropped():
                # Publications go out meanwhile (publish_during); stop once it is gone.
                while await asyncio.to_thread(listed, server, "stalled"):
                    assert sc.goods.published < MAX_BIG_MESSAGES, (
                        f"stalled reader still listed after {sc.goods.published} x {BIG} B"
                    )
                    await asyncio.sleep(0.05)
                return sc.goods.published

            dropped_after = await sc.goods.publish_during(until_dropped(), pad=BIG)
            # More after it is gone, still delivered to everyone else; with these, what went
            # through the node (~100 x 64 KiB) is well above RSS_AFTER_STALL_BOUND_KIB, so
            # keeping the publications (or the stalled queue's frames) alive would show.
            await sc.goods.publish_during(asyncio.sleep(0), pad=BIG, min_msgs=AFTER_STALL_MESSAGES)
            await sc.goods.check(pad=BIG)
            st = await asyncio.to_thread(stats, server)
            assert st["slow_consumer_closes"] == 1, st
            assert st["closes"]["4008"] == 1, st
            sc.rss.check()
            # Its queue is given back: RSS settles near the baseline.
            await asyncio.sleep(0.5)
            after = rss_kib(server)
            print(f"RSS after the stalled reader: {after} KiB (baseline {sc.rss.baseline} KiB)")
            assert after - sc.rss.baseline < RSS_AFTER_STALL_BOUND_KIB, (after, sc.rss.baseline)

            # What the stalled reader finally reads: a prefix of the messages in order, then
            # (if the close frame got into the socket) 4008, then EOF.
            def drain():
                buf, frames = rest, []
                s.settimeout(5 + SLACK)  # the 5 s close grace, then EOF
                try:
                    while True:
                        while (f := parse_frame(buf)) is not None:
                            frames.append(f[:2])
                            buf = f[2]
                        chunk = s.recv(1 << 20)
                        if not chunk:
                            break
                        buf += chunk
                except ConnectionResetError:
                    pass
                return frames

            frames = await asyncio.to_thread(drain)
            # The socket is gone (EOF or reset above): the node holds only the good clients.
            deadline = time.monotonic() + SLACK
            while (st := await asyncio.to_thread(stats, server))["connections"] != GOOD_CLIENTS:
                assert time.monotonic() < deadline, st
                await asyncio.sleep(0.1)
            msgs = [json.loads(p)["data"]["seq"] for op, p in frames if op == 1]
            assert msgs == list(range(1, len(msgs) + 1)), msgs
            assert len(msgs) < dropped_after, (len(msgs), dropped_after)
            closes = [close_code(p) for op, p in frames if op == 8]
            assert closes in ([], [4008]), closes
            print(
                f"stalled reader: dropped after {dropped_after} publications, "
                f"read {len(msgs)}, close frames {closes}"
            )

    run(go())
