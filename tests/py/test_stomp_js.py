"""A real, unmodified `@stomp/stompjs` client in Node (tests/js/stomp_client.mjs, with `ws`
as its WebSocket) against herald: token in CONNECT, CONNECTED 1.2, topic and user-queue
deliveries byte for byte, the DISCONNECT receipt, a bad token, heart-beats on an idle
connection. `npm ci --prefix tests/js` installs the client (scripts/test does)."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from herald_client import ADMIN_KEY, REPO, config_toml, mint, start_server

JS = REPO / "tests" / "js"


def node_bin() -> str:
    """`node`, with the client's packages installed."""
    node = shutil.which("node")
    if node is None or not (JS / "node_modules" / "@stomp" / "stompjs").is_dir():
        pytest.fail("node and tests/js/node_modules are needed: npm ci --prefix tests/js", pytrace=False)
    return node


def stompjs_command(server, scenario: str, **args) -> list[str]:
    """The command line of one scenario of the Node client."""
    node = node_bin()
    args = {
        "url": f"{server.ws_url}/ws/shop",
        "api": server.api_url,
        "adminKey": ADMIN_KEY,
        "project": "shop",
        "token": mint("alice"),
        **args,
    }
    return [node, str(JS / "stomp_client.mjs"), scenario, json.dumps(args)]


def stompjs(server, scenario: str, timeout: float = 60, **args) -> list[dict]:
    """Runs one scenario of the Node client; returns the events it printed."""
    proc = subprocess.run(
        stompjs_command(server, scenario, **args),
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=JS,
    )
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_stompjs_receives_topic_and_user_queue_publishes_byte_for_byte(server):
    news = '{"b": 1,  "a":[1.50, "x"]}'
    notice = '"hello \\u00e9"'
    events = stompjs(server, "deliver", publishes=[["news", news], ["user.alice", notice]])
    kinds = [e["event"] for e in events]
    # A message may arrive before the next publish's answer is printed.
    assert kinds[0] == "connected" and kinds[-2:] == ["disconnected", "closed"], events
    assert sorted(kinds[1:-2]) == ["message", "message", "published", "published"], events
    assert events[0] == {"event": "connected", "version": "1.2", "subprotocol": "v12.stomp"}
    ids = {e["topic"]: e["id"] for e in events if e["event"] == "published"}
    messages = {e["sub"]: e for e in events if e["event"] == "message"}
    assert messages["news"] == {
        "event": "message",
        "sub": "news",
        "destination": "/topic/news",
        "messageId": ids["news"],
        "contentType": "application/json",
        "body": news,
    }
    assert messages["notice"]["destination"] == "/user/queue/notice"
    assert (messages["notice"]["messageId"], messages["notice"]["body"]) == (ids["user.alice"], notice)
    assert events[-2]["command"] == "RECEIPT" and events[-2]["receiptId"].startswith("close-"), events
    # After the receipt herald closes normally.
    assert events[-1] == {"event": "closed", "code": 1000}


def test_stompjs_with_a_bad_token_gets_an_error_then_close(server):
    events = stompjs(server, "bad-token")
    assert [e["event"] for e in events] == ["error", "closed"], events
    assert events[0]["message"] == "malformed token", events
    assert events[1]["code"] == 1008


def test_herald_heart_beats_keep_an_idle_stompjs_connection_open(servers):
    server = servers.start(config=config_toml().replace("heartbeat_interval_ms = 25000", "heartbeat_interval_ms = 1000"))
    events = stompjs(server, "idle", heartbeatMs=1000, idleMs=6000)
    assert events[0] == {"event": "connected", "heartBeat": "1000,0"}, events
    # stompjs drops a connection silent for twice the interval; six intervals passed.
    assert events[1] == {"event": "still-connected", "connected": True}, events


def test_stompjs_through_sockjs_client_in_node(server):
    """The same client through `sockjs-client` (`webSocketFactory`), the base `/sockjs` with
    the project in `projectId` and the token in CONNECT."""
    news = '{"b": 1,  "a":[1.50, "x"]}'
    events = stompjs(
        server,
        "deliver",
        sockjsUrl=f"http://{server.listen}/sockjs?projectId=shop",
        publishes=[["news", news]],
    )
    kinds = [e["event"] for e in events]
    assert kinds[0] == "connected" and kinds[-2:] == ["disconnected", "closed"], events
    assert sorted(kinds[1:-2]) == ["message", "published"], events
    # SockJS offers no subprotocol; the version comes from CONNECT's accept-version.
    assert events[0] == {"event": "connected", "version": "1.2", "subprotocol": ""}
    (published,) = [e for e in events if e["event"] == "published"]
    (message,) = [e for e in events if e["event"] == "message"]
    assert message == {
        "event": "message",
        "sub": "news",
        "destination": "/topic/news",
        "messageId": published["id"],
        "contentType": "application/json",
        "body": news,
    }
    assert events[-2]["command"] == "RECEIPT", events
    assert events[-1] == {"event": "closed", "code": 1000}


#: How long the long idle lasts: a minute, past stompjs' own limit of twice the negotiated
#: 25 s (50 s without a byte from the server).
LONG_IDLE_MS = 60_000


class LongIdle:
    """A herald of its own and a stompjs client with its default heart-beats (10000,10000)
    idling on it for LONG_IDLE_MS, started in the background once the suite is collected
    (conftest.py, the `background` marker), so the minute passes alongside other tests."""

    def __init__(self):
        node_bin()
        self.dir = Path(tempfile.mkdtemp(prefix="herald-long-idle-"))
        self.server = start_server(self.dir, shards=1)
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            stompjs_command(self.server, "idle", idleMs=LONG_IDLE_MS),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=JS,
        )

    def events(self) -> list[dict]:
        left = LONG_IDLE_MS / 1000 + 30 - (time.monotonic() - self.started)
        out, err = self.proc.communicate(timeout=max(left, 1))
        assert self.proc.returncode == 0, err
        return [json.loads(line) for line in out.splitlines()]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.server.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.mark.background(start=LongIdle)
@pytest.mark.timeout(LONG_IDLE_MS / 1000 + 60)
def test_stompjs_default_heart_beats_keep_a_60_s_idle_connection_open(background):
    events = background.events()
    # stompjs' 10000,10000 against herald's 25 s sweep: herald sends every 25 s and wants none.
    assert events[0] == {"event": "connected", "heartBeat": "25000,0"}, events
    assert events[1] == {"event": "still-connected", "connected": True}, events
