"""Independent client for the herald wire contract (docs/protocol.md).

Nothing here uses herald's own code: tokens are minted with PyJWT, WebSockets are the
`websockets` package's asyncio client, HTTP is the standard library. The server is the real
binary (`HERALD_BIN`, default `target/debug/herald`), started on port 0 and discovered through
its ready line.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import select
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

REPO = Path(__file__).resolve().parents[2]

ADMIN_KEY = "test-admin-key-0123456789"
PROJECTS = {
    "shop": {"api_key": "shop-api-key-0123456789", "secret": "shop-secret-0123456789abcdef"},
    "blog": {"api_key": "blog-api-key-0123456789", "secret": "blog-secret-0123456789abcdef"},
}
HEARTBEAT_MS = 25_000

#: Seconds to wait for the ready line.
READY_TIMEOUT = 20.0
#: Seconds to wait for any single frame that must arrive.
RECV_TIMEOUT = 5.0
#: Seconds of quiet that stand for "this connection got nothing".
SILENCE = 0.4


def herald_bin() -> Path:
    p = Path(os.environ.get("HERALD_BIN", "target/debug/herald"))
    return p if p.is_absolute() else REPO / p


#: [limits] of the general suite: it connects thousands of clients from 127.0.0.1 and sends
#: and publishes in bursts, so per-address, per-connection and per-key limits are off; the
#: protection tests turn them on through `config_toml(limits=...)`.
SUITE_LIMITS = {
    "handshakes_per_ip_per_sec": 0,
    "connections_per_ip": 0,
    "max_pending_handshakes_per_ip": 0,
    "messages_per_conn_per_sec": 0,
    "api_requests_per_key_per_sec": 0,
}


def config_toml(
    shards: int = 2,
    drain_timeout_ms: int = 2000,
    extra: str = "",
    limits: dict[str, int] | None = None,
) -> str:
    merged = {**SUITE_LIMITS, **(limits or {})}
    limits_toml = "".join(f"{k} = {v}\n" for k, v in merged.items())
    text = f"""\
[server]
shards = {shards}
drain_timeout_ms = {drain_timeout_ms}

[ws]
heartbeat_interval_ms = {HEARTBEAT_MS}
max_message_bytes = 65536

[limits]
{limits_toml}
[api]
admin_key = "{ADMIN_KEY}"
"""
    for pid, p in PROJECTS.items():
        text += f"""
[[projects]]
id = "{pid}"
api_key = "{p['api_key']}"

[[projects.keys]]
kid = "k1"
alg = "HS256"
secret = "{p['secret']}"
"""
    return text + extra


# --------------------------------------------------------------------------------------------
# The server process
# --------------------------------------------------------------------------------------------


@dataclass
class Server:
    proc: subprocess.Popen
    ready: dict
    ready_raw: str
    stderr_path: Path
    #: Whatever the server printed on stdout after the ready line (drained by a thread).
    extra_stdout: list = field(default_factory=list)
    admin_key: str = ADMIN_KEY
    drain_thread: threading.Thread | None = None

    @property
    def listen(self) -> str:
        return self.ready["listen"]

    @property
    def api_listen(self) -> str:
        return self.ready["api_listen"]

    @property
    def ws_url(self) -> str:
        return f"ws://{self.listen}"

    @property
    def api_url(self) -> str:
        return f"http://{self.api_listen}"

    def ws(self, project: str) -> str:
        return f"{self.ws_url}/ws/{project}"

    def stderr_tail(self, n: int = 4000) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")[-n:]
        except OSError:
            return "<no stderr>"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Sends `sig` and waits; returns the exit code, or None when it had to be killed."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)
            return None

    def stdout_after_ready(self) -> bytes:
        """What the server printed on stdout after the ready line; call once it has exited."""
        if self.drain_thread is not None:
            self.drain_thread.join(timeout=5)
        return b"".join(self.extra_stdout)


def start_server(
    workdir: Path,
    *,
    shards: int = 2,
    config: str | None = None,
    args: tuple[str, ...] = (),
) -> Server:
    binary = herald_bin()
    if not binary.exists():
        pytest.fail(f"herald binary not found at {binary} (build it: cargo build --bins)")
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "herald.toml"
    cfg.write_text(config if config is not None else config_toml(shards=shards))
    stderr_path = workdir / "herald.stderr"
    cmd = [
        str(binary),
        "serve",
        "--config",
        str(cfg),
        "--listen",
        "127.0.0.1:0",
        "--api-listen",
        "127.0.0.1:0",
        "--state-dir",
        str(workdir / "state"),
        *args,
    ]
    with open(stderr_path, "wb") as err:
        proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err, cwd=workdir
        )
    line = _read_line(proc, READY_TIMEOUT)
    if line is None:
        exited = proc.poll()
        if exited is None:
            proc.kill()
            proc.wait(timeout=10)
            why = f"no ready line within {READY_TIMEOUT}s"
        else:
            why = f"herald exited with code {exited} before printing the ready line"
        pytest.fail(
            f"{why}; stderr:\n" + stderr_path.read_text(errors="replace")[-4000:],
            pytrace=False,
        )
    try:
        ready = json.loads(line)
    except ValueError:
        proc.kill()
        proc.wait(timeout=10)
        pytest.fail(f"ready line is not JSON: {line!r}")
    server = Server(proc=proc, ready=ready, ready_raw=line, stderr_path=stderr_path)
    server.drain_thread = threading.Thread(
        target=_drain, args=(proc, server.extra_stdout), daemon=True
    )
    server.drain_thread.start()
    for key in ("listen", "api_listen"):
        if not isinstance(ready.get(key), str):
            server.stop(signal.SIGKILL)
            pytest.fail(f"ready line lacks {key!r}: {line!r}")
    return server


def _read_line(proc: subprocess.Popen, timeout: float) -> str | None:
    """First stdout line, or None on timeout / EOF. Reads raw bytes so no buffering hides data."""
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        r, _, _ = select.select([fd], [], [], left)
        if not r:
            continue
        chunk = os.read(fd, 4096)
        if not chunk:
            return None
        buf += chunk
    line, rest = buf.split(b"\n", 1)
    if rest:
        # More than one line already: keep it so tests can see it.
        proc._herald_rest = rest  # type: ignore[attr-defined]
    return line.decode("utf-8", "replace").rstrip("\r")


def _drain(proc: subprocess.Popen, sink: list) -> None:
    rest = getattr(proc, "_herald_rest", b"")
    if rest:
        sink.append(rest)
    fd = proc.stdout.fileno()
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        sink.append(chunk)


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------


def now() -> int:
    return int(time.time())


def token_payload(sub: str | None, exp: int | None | str, claims: dict[str, Any]) -> dict[str, Any]:
    """JWT claims: `sub` and `exp` unless None (`exp="default"` is an hour from now), plus extras."""
    payload: dict[str, Any] = {}
    if sub is not None:
        payload["sub"] = sub
    if exp == "default":
        exp = now() + 3600
    if exp is not None:
        payload["exp"] = exp
    payload.update(claims)
    return payload


def mint(
    sub: str | None = "alice",
    project: str = "shop",
    *,
    exp: int | None | str = "default",
    secret: str | None = None,
    kid: str | None = "k1",
    **claims: Any,
) -> str:
    """HS256 token for `project` (its secret unless `secret` is given). `exp=None` omits exp."""
    payload = token_payload(sub, exp, claims)
    headers = {"kid": kid} if kid is not None else None
    key = secret if secret is not None else PROJECTS[project]["secret"]
    return jwt.encode(payload, key, algorithm="HS256", headers=headers)


# --------------------------------------------------------------------------------------------
# HTTP
# --------------------------------------------------------------------------------------------


@dataclass
class HttpReply:
    status: int
    headers: Any
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    method: str, url: str, body: bytes | None = None, headers: dict | None = None
) -> HttpReply:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return HttpReply(r.status, r.headers, r.read())
    except urllib.error.HTTPError as e:
        with e:
            return HttpReply(e.code, e.headers, e.read())


def publish_raw(server: Server, body: bytes | str, key: str | None = ADMIN_KEY) -> HttpReply:
    if isinstance(body, str):
        body = body.encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return http_request("POST", f"{server.api_url}/api/v1/publish", body, headers)


def publish(server: Server, body: dict | str, key: str | None = ADMIN_KEY) -> str:
    """Publishes and asserts `200 {"id": "<non-empty string>"}`; returns the id."""
    raw = body if isinstance(body, str) else json.dumps(body)
    r = publish_raw(server, raw, key)
    assert r.status == 200, f"publish answered {r.status}: {r.body!r}"
    answer = r.json()
    assert set(answer) == {"id"}, answer
    assert isinstance(answer["id"], str) and answer["id"], answer
    return answer["id"]


async def apublish(server: Server, body: dict | str, key: str | None = ADMIN_KEY) -> str:
    return await asyncio.to_thread(publish, server, body, key)


def assert_error_body(body: bytes, code: str) -> dict:
    try:
        err = json.loads(body)
    except ValueError:
        raise AssertionError(f"error body is not JSON: {body!r}") from None
    assert isinstance(err, dict) and set(err) == {"error", "message"}, err
    assert err["error"] == code, err
    assert isinstance(err["message"], str), err
    return err


def plain_get(host_port: str, path: str, headers: dict | None = None) -> HttpReply:
    host, port = host_port.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return HttpReply(r.status, r.headers, r.read())
    finally:
        c.close()


# --------------------------------------------------------------------------------------------
# WebSocket
# --------------------------------------------------------------------------------------------


async def open_ws(
    server: Server,
    project: str = "shop",
    token: str | None = None,
    *,
    via: str = "header",
    **kwargs: Any,
) -> ClientConnection:
    """Opens a WebSocket with the token in the Authorization header, the query or the
    subprotocol. Does not read the welcome frame."""
    url = server.ws(project)
    kwargs.setdefault("open_timeout", 10)
    kwargs.setdefault("close_timeout", 3)
    kwargs.setdefault("ping_interval", None)
    if token is not None:
        if via == "header":
            kwargs["additional_headers"] = {"Authorization": f"Bearer {token}"}
        elif via == "query":
            url += f"?token={token}"
        elif via == "subprotocol":
            kwargs["subprotocols"] = ["herald.v1", f"bearer.{token}"]
        else:
            raise ValueError(via)
    return await connect(url, **kwargs)


async def recv_json(ws: ClientConnection, timeout: float = RECV_TIMEOUT) -> tuple[str, dict]:
    """Next frame, which must be a JSON text frame: (raw text, parsed)."""
    try:
        raw = await asyncio.wait_for(ws.recv(), timeout)
    except asyncio.TimeoutError:
        raise AssertionError(f"no frame within {timeout}s") from None
    assert isinstance(raw, str), f"expected a text frame, got binary {raw!r}"
    return raw, json.loads(raw)


async def client(
    server: Server,
    sub: str = "alice",
    project: str = "shop",
    *,
    via: str = "header",
    **claims: Any,
) -> tuple[ClientConnection, dict]:
    """Connects with a fresh token and returns (ws, welcome), asserting the welcome type."""
    ws = await open_ws(server, project, mint(sub, project, **claims), via=via)
    _, welcome = await recv_json(ws)
    assert welcome.get("type") == "welcome", welcome
    return ws, welcome


async def request(ws: ClientConnection, op: dict) -> dict:
    """Sends an op and returns the next frame."""
    await ws.send(json.dumps(op))
    _, reply = await recv_json(ws)
    return reply


async def subscribe(ws: ClientConnection, topic: str, rid: Any = 1) -> None:
    reply = await request(ws, {"op": "subscribe", "topic": topic, "id": rid})
    assert reply == {"type": "ack", "id": rid}, reply


async def expect_silence(ws: ClientConnection, seconds: float = SILENCE) -> None:
    try:
        raw = await asyncio.wait_for(ws.recv(), seconds)
    except asyncio.TimeoutError:
        return
    raise AssertionError(f"expected no frame, got {raw!r}")


async def expect_close(ws: ClientConnection, code: int, timeout: float = RECV_TIMEOUT) -> list:
    """Reads until the server's close frame arrives; asserts its code. Returns the frames
    received before it."""
    before = []
    deadline = time.monotonic() + timeout
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no close within {timeout}s; frames: {before!r}")
            try:
                before.append(await asyncio.wait_for(ws.recv(), left))
            except asyncio.TimeoutError:
                raise AssertionError(f"no close within {timeout}s; frames: {before!r}") from None
    except ConnectionClosed as e:
        assert e.rcvd is not None, f"connection dropped without a close frame ({e!r}); frames: {before!r}"
        assert e.rcvd.code == code, (
            f"close code {e.rcvd.code} (reason {e.rcvd.reason!r}), expected {code}; frames: {before!r}"
        )
        assert ws.close_code == code
    return before


async def expect_refusal(
    server: Server,
    project: str,
    token: str | None,
    status: int,
    error: str,
    via: str = "header",
) -> Any:
    """Asserts the upgrade is refused with `status` and JSON `{"error": error, ...}`."""
    try:
        ws = await open_ws(server, project, token, via=via)
    except InvalidStatus as e:
        r = e.response
        assert r.status_code == status, (r.status_code, bytes(r.body))
        assert_error_body(bytes(r.body), error)
        return r
    await ws.close()
    raise AssertionError(f"upgrade to /ws/{project} was accepted, expected {status} {error}")


async def close_all(conns: list) -> None:
    await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)


def run(coro: Any, timeout: float = 60.0) -> Any:
    """Runs a test coroutine with an overall deadline."""

    async def bounded() -> Any:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


def assert_delivery(msg: dict, topic: str, data: Any, mid: str) -> None:
    """A delivery frame with exactly the contract's fields."""
    assert set(msg) == {"type", "topic", "data", "id", "ts"}, msg
    assert msg["type"] == "message", msg
    assert msg["topic"] == topic, msg
    assert msg["data"] == data, msg
    assert msg["id"] == mid, msg
    ts = msg["ts"]
    assert isinstance(ts, int) and not isinstance(ts, bool), msg
    assert abs(ts - time.time() * 1000) < 60_000, f"ts {ts} is not near now"
