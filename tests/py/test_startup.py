"""The ready line: one JSON line on stdout once every shard listens and the API is up."""

import signal

from herald_client import PROJECTS, http_request


def _assert_ready(server, shards):
    ready = server.ready
    assert set(ready) == {"event", "listen", "api_listen", "shards"}, server.ready_raw
    assert ready["event"] == "ready", ready
    assert ready["shards"] == shards, ready
    for key in ("listen", "api_listen"):
        host, port = ready[key].rsplit(":", 1)
        assert host == "127.0.0.1", ready
        assert port.isdigit() and 0 < int(port) < 65536, ready
    assert ready["listen"] != ready["api_listen"], ready


def test_ready_line_is_exact_and_alone_on_stdout(server):
    _assert_ready(server, 2)
    # The API answers as soon as the line is printed: publish to a project with no clients.
    r = http_request(
        "POST",
        f"{server.api_url}/api/v1/publish",
        b'{"project":"shop","topic":"news","data":1}',
        {"Authorization": f"Bearer {PROJECTS['shop']['api_key']}"},
    )
    assert r.status == 200, (r.status, r.body)
    server.stopped_by_test = True
    assert server.stop(signal.SIGTERM, timeout=10) == 0, server.stderr_tail()
    assert server.stdout_after_ready() == b"", "stdout must hold only the ready line"


def test_shards_flag_overrides_the_file(servers):
    server = servers.start(shards=2, args=("--shards", "3"))
    _assert_ready(server, 3)
