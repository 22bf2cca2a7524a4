"""Descriptors are kept for the API: a flood of client sockets that would take every
descriptor of the process is closed at accept once it reaches
`RLIMIT_NOFILE - api.max_connections - 256`, so the API still answers a full
`api.max_connections` of connections and a health check."""

import socket
import time

from herald_client import config_toml, plain_get

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


def test_a_client_flood_leaves_descriptors_for_the_api(servers, tmp_path, monkeypatch):
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
    server = servers.start(config=config)
    host, port = server.listen.rsplit(":", 1)

    # More client sockets than the process has descriptors.
    flood = []
    try:
        for _ in range(NOFILE + 100):
            flood.append(socket.create_connection((host, int(port)), timeout=10))
        deadline = time.monotonic() + 20
        while True:
            text = plain_get(server.api_listen, "/metrics", {"Accept": "text/plain"}).body.decode()
            refused = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith('herald_handshakes_total{outcome="at_capacity"}')
            )
            if refused >= 100:
                break
            assert time.monotonic() < deadline, f"only {refused} client sockets closed at accept"
            time.sleep(0.1)

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
    assert "kept for the API" in server.stderr_tail(200_000)


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
