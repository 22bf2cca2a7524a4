"""Slow API clients are closed by the head timeout, and the log says so once a second, not
once a connection."""

import socket
import time

from herald_client import config_toml


def test_trickling_heads_are_closed_and_logged_throttled(servers):
    config = config_toml(shards=1).replace("[api]\n", "[api]\nheader_read_timeout_ms = 300\n", 1)
    server = servers.start(config=config)
    host, port = server.api_listen.rsplit(":", 1)
    slow = []
    for _ in range(30):
        s = socket.create_connection((host, int(port)), timeout=10)
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        slow.append(s)
    started = time.monotonic()
    for s in slow:
        assert s.recv(1024) == b"", "closed without an answer"
        s.close()
    assert time.monotonic() - started < 10
    deadline = time.monotonic() + 5
    while "api.header_read_timeout_ms" not in server.stderr_tail(200_000):
        assert time.monotonic() < deadline, server.stderr_tail()
        time.sleep(0.05)
    lines = [l for l in server.stderr_tail(200_000).splitlines() if "api.header_read_timeout_ms" in l]
    assert 1 <= len(lines) <= 3, lines
