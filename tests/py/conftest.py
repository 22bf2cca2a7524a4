"""Fixtures: a real herald process per test, on port 0, stopped at teardown."""

from __future__ import annotations

import signal

import pytest

from herald_client import Server, start_server


class Servers:
    """Starts servers for one test and stops every one of them at teardown."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.started: list[Server] = []

    def start(self, **kwargs) -> Server:
        server = start_server(self.tmp_path / f"herald{len(self.started)}", **kwargs)
        self.started.append(server)
        return server

    def teardown(self) -> None:
        crashed = []
        for s in self.started:
            if s.proc.poll() is not None and not getattr(s, "stopped_by_test", False):
                crashed.append(
                    f"herald exited on its own during the test (code {s.proc.returncode}); "
                    f"stderr:\n{s.stderr_tail()}"
                )
            s.stop(signal.SIGTERM, timeout=10)
            if s.drain_thread is not None:
                s.drain_thread.join(timeout=5)
            if s.proc.stdout is not None and not (s.drain_thread and s.drain_thread.is_alive()):
                s.proc.stdout.close()
        if crashed:
            pytest.fail("\n".join(crashed), pytrace=False)


@pytest.fixture
def servers(tmp_path):
    s = Servers(tmp_path)
    yield s
    s.teardown()


@pytest.fixture
def server(servers) -> Server:
    """herald with the two test projects (shop, blog) and 2 shards."""
    return servers.start(shards=2)


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "background(start): the test's slow part (`start()`, an object with `stop()`) begins "
        "as soon as the suite is collected and runs alongside the other tests; the test gets "
        "it as the `background` fixture",
    )


#: The started slow parts, by test node id.
_BACKGROUND: dict = {}


def pytest_collection_finish(session):
    for item in session.items:
        marker = item.get_closest_marker("background")
        if marker is None:
            continue
        try:
            started = marker.kwargs["start"]()
        except (Exception, pytest.fail.Exception) as e:  # reported by the test itself
            _BACKGROUND[item.nodeid] = e
            continue
        _BACKGROUND[item.nodeid] = started
        session.config.add_cleanup(started.stop)


@pytest.fixture
def background(request):
    """The slow part of a `background` test, started at collection (or now, if it was not)."""
    started = _BACKGROUND.pop(request.node.nodeid, None)
    if isinstance(started, BaseException):
        raise started
    if started is None:
        started = request.node.get_closest_marker("background").kwargs["start"]()
        request.addfinalizer(started.stop)
    return started
