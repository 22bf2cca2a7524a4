"""Descriptors are kept for the API: client sockets may use those below
`RLIMIT_NOFILE - api.max_connections - 256`, and handshakes in progress at most half of
those (at that cap each new socket closes the oldest handshake in progress). A flood of idle
sockets that would take every descriptor of the process therefore leaves the API a full
`api.max_connections` of connections and a health check, and a real client still gets in."""

import socket
import time

from herald_client import client, config_toml, plain_get, run

NOFILE = 600
API_MAX = 32


def _healthz_on(s: socket.socket) -> bytes:
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    got = b""
    while b'{"status":"ok"}' not in got:
        chunk = s.recv(4096)
        assert chunk, f"closed: {got!r}"
        got += chunk
    return got.split(b"\r\n", 1)[0]


def _limited_server(servers, tmp_path, monkeypatch):
    """One shard under `ulimit -n NOFILE`, idle handshakes kept a minute."""
    from herald_client import herald_bin

    wrapper = tmp_path / "herald-limited"
    wrapper.write_text(f'#!/bin/sh\nulimit -n {NOFILE} || exit 97\nexec "{herald_bin()}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("HERALD_BIN", str(wrapper))
    config = (
        config_toml(shards=1)
        .replace("[ws]\n", "[ws]\nhandshake_timeout_ms = 60000\n", 1)
        .replace("[api]\n", f"[api]\nmax_connections = {API_MAX}\nheader_read_timeout_ms = 60000\n", 1)
    )
    return servers.start(config=config)


def _flood(server) -> list:
    """More idle client sockets than the process has descriptors; returns once at least 100
    of them were closed (evicted, or closed at accept)."""
    host, port = server.listen.rsplit(":", 1)
    flood = []
    for _ in range(NOFILE + 100):
        flood.append(socket.create_connection((host, int(port)), timeout=10))
    deadline = time.monotonic() + 20
    while True:
        text = plain_get(server.api_listen, "/metrics", {"Accept": "text/plain"}).body.decode()
        closed = sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('herald_handshakes_total{outcome="at_capacity"}')
            or line.startswith('herald_handshakes_total{outcome="evicted"}')
        )
        if closed >= 100:
            return flood
        assert time.monotonic() < deadline, f"only {closed} client sockets closed"
        time.sleep(0.1)


def test_a_client_flood_leaves_descriptors_for_the_api(servers, tmp_path, monkeypatch):
    server = _limited_server(servers, tmp_path, monkeypatch)
    flood = []
    try:
        flood = _flood(server)

        # The API's share: a full cap of connections, each answered.
        host_api, port_api = server.api_listen.rsplit(":", 1)
        api = [socket.create_connection((host_api, int(port_api)), timeout=10) for _ in range(API_MAX)]
        try:
            for s in api:
                assert _healthz_on(s) == b"HTTP/1.1 200 OK"
            # And a health check beyond the cap still gets through.
            assert plain_get(server.api_listen, "/healthz").status == 200
        finally:
            for s in api:
                s.close()
    finally:
        for s in flood:
            s.close()
    assert "closing the oldest to make room" in server.stderr_tail(200_000)


def test_a_small_open_files_limit_lowers_the_api_connection_cap(servers, tmp_path, monkeypatch):
    from herald_client import herald_bin

    # 1024 descriptors: the reserve asked (1024 for the default 768 API connections) is cut to
    # half, 512, so 256 API connections fit beside the node's own 256.
    wrapper = tmp_path / "herald-limited"
    wrapper.write_text(f'#!/bin/sh\nulimit -n 1024 || exit 97\nexec "{herald_bin()}" "$@"\n')
    wrapper.chmod(0o755)
    monkeypatch.setenv("HERALD_BIN", str(wrapper))
    config = config_toml(shards=1).replace(
        "[api]\n", "[api]\nmax_connections = 768\nheader_read_timeout_ms = 60000\n", 1
    )
    server = servers.start(config=config)
    host_api, port_api = server.api_listen.rsplit(":", 1)
    api = []
    try:
        for _ in range(300):
            s = socket.create_connection((host_api, int(port_api)), timeout=10)
            api.append(s)
            assert _healthz_on(s) == b"HTTP/1.1 200 OK"
        text = plain_get(server.api_listen, "/metrics", {"Accept": "text/plain"}).body.decode()
        open_now = [
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith("herald_api_connections ")
        ]
        assert open_now == [256.0], open_now
    finally:
        for s in api:
            s.close()
    log = server.stderr_tail(200_000)
    assert "api.max_connections lowered" in log
    assert "effective=256" in log and "configured=768" in log, log[-2000:]


def test_at_the_descriptor_ceiling_a_new_client_evicts_an_idle_handshake(
    servers, tmp_path, monkeypatch
):
    """Idle unauthenticated sockets flood a node whose client descriptors are far fewer than
    `limits.max_pending_handshakes` (10,000): a real client still connects, and the oldest
    idle socket is closed for it."""
    server = _limited_server(servers, tmp_path, monkeypatch)
    flood = []
    try:
        flood = _flood(server)

        async def go():
            for i in range(3):
                ws, welcome = await client(server, f"u{i}")
                assert welcome["user"] == f"u{i}", welcome
                await ws.close()

        run(go(), timeout=30)
        # The first idle socket was evicted: the server closed it unread.
        flood[0].settimeout(10)
        assert flood[0].recv(1) == b""
    finally:
        for s in flood:
            s.close()
    assert "closing the oldest to make room" in server.stderr_tail(200_000)
