"""docs/protocol.md is the wire contract: it names every op, error code, close code and
handshake refusal the code has, and its examples run unchanged against the real server.

The tables are compared with the source both ways, so an op, code or refusal added to the code
without the doc (or left in the doc after the code dropped it) fails here. Each example block
(a `<!-- example ... -->` comment followed by a transcript) is played on a fresh server; the
browser example runs in Node's WHATWG WebSocket, the same API a browser has.
"""

from __future__ import annotations

import asyncio
import json
import re
import select
import shutil
import socket
import subprocess
import time
from typing import Any
from dataclasses import dataclass

import pytest

from herald_client import (
    ADMIN_KEY,
    REPO,
    config_toml,
    expect_close,
    expect_silence,
    mint,
    now,
    open_ws,
    http_request,
    publish,
    recv_json,
    run,
)

DOC_PATH = REPO / "docs" / "protocol.md"
DOC = DOC_PATH.read_text()
SRC = REPO / "src"


# --------------------------------------------------------------------------------------------
# Reading the doc and the code
# --------------------------------------------------------------------------------------------


def section(title: str) -> str:
    """The text under the heading `title` (any level) up to the next heading of the same or a
    higher level."""
    m = re.search(rf"^(#+) {re.escape(title)}\n", DOC, re.M)
    assert m, f"docs/protocol.md has no heading {title!r}"
    level = len(m.group(1))
    rest = DOC[m.end():]
    end = re.search(rf"^#{{1,{level}}} ", rest, re.M)
    return rest[: end.start()] if end else rest


def tables(text: str) -> list[list[list[str]]]:
    """Every Markdown table in `text`: rows (header and separator left out) of cells."""
    found, rows = [], None
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if rows is None:
                rows = []  # the header
            elif not all(set(c) <= set("-: ") for c in cells):
                rows.append(cells)
        elif rows is not None:
            found.append(rows)
            rows = None
    return found


def table(title: str, first_header: str) -> list[list[str]]:
    """The table under `title` whose header starts with `first_header`."""
    text = section(title)
    for m in re.finditer(r"^\|(.*)\|\n\|[-| :]+\|\n", text, re.M):
        if m.group(1).split("|")[0].strip() == first_header:
            return tables(text[m.start():])[0]
    raise AssertionError(f"no table with a `{first_header}` column under {title!r}")


def unquote(cell: str) -> str:
    return cell.strip().strip("`")


def source(path: str) -> str:
    return (SRC / path).read_text()


def fn_body(text: str, signature: str) -> str:
    """The body of the Rust function whose declaration contains `signature` (up to the first
    line holding only `}` at the declaration's indentation)."""
    start = text.index(signature)
    indent = text[text.rindex("\n", 0, start) + 1 : start]
    indent = indent[: len(indent) - len(indent.lstrip())]
    end = text.index(f"\n{indent}}}\n", start)
    return text[start:end]


# --------------------------------------------------------------------------------------------
# Tables against the code
# --------------------------------------------------------------------------------------------


def test_every_close_code_is_documented():
    close_rs = source("ws/close.rs")
    listed = re.search(r"CLOSE_CODES: \[u16; \d+\] = \[([^\]]*)\]", close_rs)
    assert listed, "CLOSE_CODES not found in src/ws/close.rs"
    codes = {int(c) for c in re.findall(r"\d+", listed.group(1))}
    mapped = {int(c) for c in re.findall(r"=> (\d{4}),", fn_body(close_rs, "pub fn code("))}
    assert codes == mapped, "CLOSE_CODES and CloseReason::code disagree"
    documented = {int(unquote(r[0])) for r in table("Close codes", "code")}
    assert documented == codes, (
        f"close codes in the code but not the doc: {sorted(codes - documented)}; "
        f"in the doc but not the code: {sorted(documented - codes)}"
    )


def test_every_close_reason_text_is_documented():
    close_rs = source("ws/close.rs")
    texts = set(re.findall(r'=> "([^"]+)",', fn_body(close_rs, "pub fn text(")))
    # Variants carrying their text get it where they are built.
    for path in SRC.rglob("*.rs"):
        texts |= set(
            re.findall(
                r'CloseReason::(?:Protocol|InvalidData|Policy)\(\s*"([^"]+)"', path.read_text()
            )
        )
    assert len(texts) > 10, texts
    documented = section("Close codes")
    missing = sorted(t for t in texts if f"`{t}`" not in documented)
    assert not missing, f"close reasons the doc does not name: {missing}"


def test_every_op_is_documented():
    ops_rs = fn_body(source("ws/ops.rs"), "pub fn parse<")
    ops = set(re.findall(r'Some\("([a-z_]+)"\) =>', ops_rs))
    assert {"subscribe", "ping"} <= ops, ops
    documented = {unquote(r[0]) for r in table("Requests", "op")}
    assert documented == ops, (
        f"ops in the code but not the doc: {sorted(ops - documented)}; "
        f"in the doc but not the code: {sorted(documented - ops)}"
    )
    for op in ops:
        assert re.search(rf"^### {op}\n", DOC, re.M), f"no `### {op}` section with its examples"


def test_every_error_code_is_documented():
    codes = set(re.findall(r'=> "([a-z_]+)",', fn_body(source("ws/ops.rs"), "fn as_str(")))
    assert "bad_request" in codes, codes
    documented = {unquote(r[0]) for r in table("Requests", "code")}
    assert documented == codes, (
        f"error codes in the code but not the doc: {sorted(codes - documented)}; "
        f"in the doc but not the code: {sorted(documented - codes)}"
    )


def test_every_handshake_refusal_is_documented():
    refusals = {
        (int(s), e)
        for s, e in re.findall(r'status: (\d{3}),\s*error: "([a-z_]+)"', source("ws/handshake.rs"))
    }
    assert (401, "unauthorized") in refusals, refusals
    documented = {(int(r[0]), unquote(r[1])) for r in table("Refusals", "status")}
    assert documented == refusals, (
        f"refusals in the code but not the doc: {sorted(refusals - documented)}; "
        f"in the doc but not the code: {sorted(documented - refusals)}"
    )


def test_every_token_refusal_message_is_documented():
    auth = source("auth/mod.rs")
    enum = auth[auth.index("pub enum AuthError") :]
    enum = enum[: enum.index("\n}\n")]
    messages = re.findall(r'#\[error\("([^"]*)"\)\]', enum)
    assert len(messages) >= 6, messages
    documented = {unquote(r[0]) for r in table("Refusals", "message")}
    for m in messages:
        fixed = m.split("{")[0]  # a `{0}` part names the claim
        assert any(d.startswith(fixed) for d in documented), f"401 message {m!r} not documented"


def test_welcome_and_message_fields_are_documented():
    conn_rs = source("ws/codec/herald_v1.rs")
    welcome = conn_rs[conn_rs.index("struct Welcome") :]
    welcome = welcome[: welcome.index("\n}\n")]
    fields = set(re.findall(r"^\s+(\w+):", welcome, re.M)) - {"kind"} | {"type"}
    assert {unquote(r[0]) for r in table("Welcome", "field")} == fields
    v1_rs = source("ws/codec/herald_v1.rs")
    # The frame is a per-topic head and a body shared by every topic.
    frame = (
        fn_body(v1_rs, "pub fn message_head(")
        + fn_body(v1_rs, "pub fn message_head_at(")
        + fn_body(v1_rs, "pub fn message_body(")
    )
    fields = set(re.findall(r'\\"(\w+)\\":', frame))
    assert {unquote(r[0]) for r in table("Delivered messages", "field")} == fields


def test_doc_names_only_files_that_exist():
    links = re.findall(r"\]\(([^)#:]+)\)", DOC)
    paths = re.findall(r"`((?:docs|tests|src)/[\w./-]+)`", DOC)
    assert links and paths
    for link in links:
        assert (DOC_PATH.parent / link).exists(), f"link to a missing file: {link}"
    for p in paths:
        assert (REPO / p).exists(), f"names a missing file: {p}"
    readme = (REPO / "README.md").read_text()
    assert "`docs/protocol.md`" in readme.strip().split("\n\n")[-1], "README's closing pointer"
    assert "of the design" not in readme


# --------------------------------------------------------------------------------------------
# The examples, played against the server
# --------------------------------------------------------------------------------------------


@dataclass
class Example:
    name: str
    project: str
    claims: dict
    overrides: dict
    lines: list[str]


def examples() -> list[Example]:
    headings = [(m.start(), m.group(1)) for m in re.finditer(r"^#+ (.*)$", DOC, re.M)]
    found: list[Example] = []
    for m in re.finditer(r"<!-- example (.*?) -->\n```\n(.*?)```\n", DOC, re.S):
        heading = [h for at, h in headings if at < m.start()][-1]
        settings, body = m.group(1), m.group(2)
        project = re.search(r"project=(\w+)", settings).group(1)
        claims = json.loads(re.search(r"token=(\{.*?\})(?: |$)", settings).group(1))
        overrides = dict(re.findall(r"(\w+\.\w+|history)=(\S+)", settings))
        n = sum(e.name.startswith(heading) for e in found)
        found.append(Example(f"{heading} {n + 1}", project, claims, overrides, body.splitlines()))
    return found


EXAMPLES = examples()


def example_config(ex: Example) -> str:
    """The suite's config, `shop` allowing client publishes, with the example's settings:
    `ws.<key>=<value>`, `limits.<key>=<value>` and `project.<key>=<value>` (its project)."""
    limits = {k.split(".", 1)[1]: int(v) for k, v in ex.overrides.items() if k.startswith("limits.")}
    text = config_toml(shards=2, limits=limits)
    text = text.replace('id = "shop"\n', 'id = "shop"\nallow_client_publish = true\n')
    for key, value in ex.overrides.items():
        table_name, name = key.split(".") if "." in key else (key, key)
        if table_name == "ws":
            text = text.replace("[ws]\n", f"[ws]\n{name} = {value}\n", 1)
        elif key == "history":
            # `[[projects.history]]` of the example's project, as an inline array of tables.
            text = text.replace(
                f'id = "{ex.project}"\n',
                f'id = "{ex.project}"\nhistory = [{{topics = "{value}"}}]\n',
            )
        elif table_name == "project":
            text = text.replace(f'id = "{ex.project}"\n', f'id = "{ex.project}"\n{name} = {value}\n')
        else:
            assert table_name == "limits", key
    return text


def token_for(project: str, claims: dict, exp_default: int = 3600) -> tuple[str, int | None]:
    """A token with `claims`; `exp` is seconds from now (default `exp_default`), `"past"` (an
    hour ago) or `None`/`"none"` (no exp). Returns the token and its exp."""
    claims = dict(claims)
    exp = claims.pop("exp", exp_default)
    if exp in (None, "none"):
        exp = None
    elif exp == "past":
        exp = now() - 3600
    else:
        exp = now() + int(exp)
    sub = claims.pop("sub")
    return mint(sub, project, exp=exp, **claims), exp


#: The epoch of every history stream in the examples; the server's differs on every run.
DOC_EPOCH = "19ad2f3c5e1-0"


def same_epochs(got: Any, known: dict) -> Any:
    """`got` with every `epoch` (of a stream this run) replaced by the doc's: one run's
    streams share an epoch until one is lost, which no example does."""
    if isinstance(got, dict):
        out = {}
        for k, v in got.items():
            if k == "epoch" and isinstance(v, str):
                assert known.setdefault("epoch", v) == v, f"epoch {v}, before {known['epoch']}"
                v = DOC_EPOCH
            out[k] = same_epochs(v, known)
        return out
    return got


def assert_matches(expected: dict, got: dict, raw: str, known: dict) -> None:
    """`got` has exactly the fields of `expected` with its values, except the values that
    differ on every run, which are checked against what the test knows."""
    got = same_epochs(got, known)
    assert set(got) == set(expected), f"expected {expected}, got {raw}"
    kind = expected.get("type")
    for k, want in expected.items():
        v = got[k]
        if (kind, k) == ("welcome", "conn"):
            assert isinstance(v, str) and v, raw
            known["conn"] = (want, v)
        elif (kind, k) in (("welcome", "exp"), ("ack", "exp")):
            assert v == known["exp"], f"exp {v}, the token says {known['exp']}: {raw}"
        elif (kind, k) == ("message", "id"):
            assert isinstance(v, str) and v, raw
            if known.get("mid") is not None:
                assert v == known["mid"], f"message id {v}, the API answered {known['mid']}"
        elif (kind, k) == ("message", "ts"):
            assert isinstance(v, int) and abs(v - time.time() * 1000) < 60_000, raw
        else:
            assert v == want, f"{k}: expected {want!r}, got {v!r} in {raw}"


async def play(server, ex: Example) -> None:
    token, exp = token_for(ex.project, ex.claims)
    known = {"exp": exp, "mid": None, "conn": None}
    ws = await open_ws(server, ex.project, token, via="subprotocol")
    assert ws.subprotocol == "herald.v1"
    closed = False
    try:
        for line in ex.lines:
            if line.startswith("> "):
                text = line[2:]
                for m in re.finditer(r'"<token ([^>]*)>"', text):
                    claims = dict(kv.split("=", 1) for kv in m.group(1).split())
                    # A list value (`topics=["news"]`) is JSON; the others are strings.
                    claims = {k: json.loads(v) if v.startswith("[") else v for k, v in claims.items()}
                    fresh, known["exp"] = token_for(ex.project, claims, exp_default=7200)
                    text = text.replace(m.group(0), json.dumps(fresh))
                if "epoch" in known:
                    text = text.replace(DOC_EPOCH, known["epoch"])
                await ws.send(text)
                known["mid"] = None
            elif line.startswith("< close "):
                code, _, reason = line[len("< close ") :].partition(" ")
                before = await expect_close(ws, int(code))
                assert before == [], f"frames before the close: {before}"
                assert ws.close_reason == reason, ws.close_reason
                closed = True
            elif line.startswith("< "):
                raw, got = await recv_json(ws)
                expected = json.loads(line[2:])
                assert_matches(expected, got, raw, known)
                if expected.get("type") == "message":
                    data = re.search(r'"data":(.*),"id":', line).group(1)
                    assert f'"data":{data},' in raw, f"data not passed byte for byte: {raw}"
            elif line.startswith(("POST ", "DELETE ")):
                method, rest = line.split(" ", 1)
                path, _, body = rest.partition(" ")
                if known["conn"] is not None:
                    path = path.replace(*known["conn"])  # the doc's conn is the welcome's
                r = await asyncio.to_thread(
                    http_request,
                    method,
                    server.api_url + path,
                    body.encode() or None,
                    {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"},
                )
                assert r.status in (200, 204), (method, path, r.status, r.body)
                known["mid"] = r.json().get("id") if path == "/api/v1/publish" else None
            else:
                raise AssertionError(f"example line not understood: {line!r}")
        if not closed:
            await expect_silence(ws)
    finally:
        await ws.close()


@pytest.mark.parametrize("ex", EXAMPLES, ids=[e.name for e in EXAMPLES])
def test_example_runs_against_the_server(servers, ex):
    server = servers.start(config=example_config(ex))
    run(play(server, ex))


def test_examples_cover_every_op_and_error_code():
    sent = "\n".join(line for e in EXAMPLES for line in e.lines if line.startswith("> "))
    got = "\n".join(line for e in EXAMPLES for line in e.lines if line.startswith("< "))
    for op in (unquote(r[0]) for r in table("Requests", "op")):
        assert f'"op":"{op}"' in sent, f"no example sends `{op}`"
    for code in (unquote(r[0]) for r in table("Requests", "code")):
        assert f'"code":"{code}"' in got, f"no example shows the error `{code}`"
    assert any(line.startswith("< close ") for e in EXAMPLES for line in e.lines)
    statuses = {int(re.match(r"HTTP/1.1 (\d+)", r).group(1)) for _, r in REFUSALS}
    assert {401, 404} <= statuses, f"refusal examples: {statuses}"


REFUSALS = re.findall(r"<!-- refusal-example (.*?) -->\n```http\n(.*?)```\n", DOC, re.S)


@pytest.mark.parametrize("settings,expected", REFUSALS, ids=[s for s, _ in REFUSALS])
def test_refusal_example_is_the_server_answer(server, settings, expected):
    project = re.search(r"project=(\w+)", settings).group(1)
    claims = json.loads(re.search(r"token=(\{.*?\})(?: |$)", settings).group(1))
    token, _ = token_for("shop", claims)
    host, port = server.listen.rsplit(":", 1)
    request = (
        f"GET /ws/{project} HTTP/1.1\r\nHost: {server.listen}\r\nUpgrade: websocket\r\n"
        "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
        f"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    answer = b""
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(request.encode())
        while chunk := s.recv(65536):  # the server closes after its answer
            answer += chunk
    head, body = expected.rstrip("\n").split("\n\n", 1)
    assert answer.decode() == head.replace("\n", "\r\n") + "\r\n\r\n" + body


# --------------------------------------------------------------------------------------------
# The browser example, in a WHATWG WebSocket
# --------------------------------------------------------------------------------------------


def node_with_websocket() -> list[str]:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed")
    for flags in ([], ["--experimental-websocket"]):
        r = subprocess.run(
            [node, *flags, "-e", "process.exit(typeof WebSocket === 'function' ? 0 : 1)"],
            capture_output=True,
            timeout=30,
        )
        if r.returncode == 0:
            return [node, *flags]
    pytest.skip("this node has no WebSocket (needs Node 20.10 or later)")


def browser_example() -> str:
    m = re.search(r"<!-- browser-example -->\n```js\n(.*?)```\n", DOC, re.S)
    assert m, "docs/protocol.md has no browser example"
    return m.group(1)


def test_browser_example_connects_subscribes_and_receives(server, tmp_path):
    code = browser_example()
    assert '["herald.v1", "bearer." + token]' in code
    script = tmp_path / "browser.js"
    script.write_text(
        code
        + """
const ws = connectHerald(process.argv[2], process.argv[3], (topic, data) => {
  console.log(JSON.stringify({ protocol: ws.protocol, topic, data }));
  process.exit(0);
});
ws.addEventListener("close", (e) => {
  console.log(JSON.stringify({ closed: e.code }));
  process.exit(1);
});
"""
    )
    url = f"{server.ws_url}/ws/shop"
    proc = subprocess.Popen(
        [*node_with_websocket(), str(script), url, mint("alice")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        # The page subscribes once welcomed; publish until its subscription catches one.
        deadline = time.monotonic() + 20
        while True:
            assert time.monotonic() < deadline, "the browser example received nothing"
            publish(server, {"project": "shop", "topic": "news", "data": {"title": "hi"}})
            if select.select([proc.stdout], [], [], 0.3)[0]:
                line = proc.stdout.readline()
                assert line, f"node exited {proc.wait(timeout=10)}: {proc.stderr.read()!r}"
                break
        got = json.loads(line)
        assert got == {"protocol": "herald.v1", "topic": "news", "data": {"title": "hi"}}, got
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_recovery_example_ends_with_every_message_once_in_order(servers, tmp_path):
    """The recovery recipe, in a WHATWG WebSocket: its connection is dropped after 3 messages;
    it reconnects, recovers, and what it handed the page is consecutive, with no duplicate."""
    m = re.search(r"<!-- recovery-example -->\n```js\n(.*?)```\n", DOC, re.S)
    assert m, "docs/protocol.md has no recovery example"
    text = config_toml(shards=2).replace(
        'id = "shop"\n', 'id = "shop"\nhistory = [{topics = "news*"}, {topics = "user.*"}]\n'
    )
    server = servers.start(config=text)
    script = tmp_path / "recovery.js"
    script.write_text(
        m.group(1)
        + """
let handed = 0;
const first = connectWithRecovery(process.argv[2], process.argv[3], ["news"],
  (topic, data) => {
    console.log(JSON.stringify({ topic, data }));
    handed += 1;
    if (handed === 3) first.close(); // the network drops; the page reconnects by itself
    if (handed === 15) process.exit(0);
  },
  (topic) => { console.log(JSON.stringify({ lost: topic })); process.exit(1); });
"""
    )
    proc = subprocess.Popen(
        [*node_with_websocket(), str(script), f"{server.ws_url}/ws/shop", mint("alice")],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    got = []
    try:
        deadline = time.monotonic() + 40
        n = 0
        while len(got) < 15:
            assert time.monotonic() < deadline, f"the recovery example handed on only {got}"
            n += 1
            publish(server, {"project": "shop", "topic": "news", "data": n})
            while select.select([proc.stdout], [], [], 0.1)[0]:
                line = proc.stdout.readline()
                assert line, f"node exited {proc.wait(timeout=10)}: {proc.stderr.read()!r}"
                got.append(json.loads(line))
                if len(got) == 15:
                    break
        assert all(g.get("topic") == "news" for g in got), got
        data = [g["data"] for g in got]
        assert data == list(range(data[0], data[0] + 15)), data
    finally:
        proc.kill()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()


def test_browser_offering_bearer_alone_aborts(server, tmp_path):
    """Why the browser example offers `herald.v1`: the server selects it only when offered, and
    a WHATWG WebSocket that offered subprotocols aborts when none is selected."""
    script = tmp_path / "bearer_alone.js"
    script.write_text(
        """
const ws = new WebSocket(process.argv[2], JSON.parse(process.argv[3]));
let opened = false;
const failed = () => { if (!opened) console.log("failed"); process.exit(0); };
ws.onopen = () => { opened = true; console.log("open " + JSON.stringify(ws.protocol)); ws.close(); };
ws.onerror = failed;
ws.onclose = failed;
"""
    )
    url = f"{server.ws_url}/ws/shop"
    token = mint("alice")
    node = node_with_websocket()
    outcomes = []
    for offered in (["bearer." + token], ["herald.v1", "bearer." + token]):
        r = subprocess.run(
            [*node, str(script), url, json.dumps(offered)],
            capture_output=True,
            text=True,
            timeout=30,
        )
        outcomes.append(r.stdout.split("\n")[0])
    assert outcomes == ["failed", 'open "herald.v1"'], outcomes
