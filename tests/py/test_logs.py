"""Logs: `--log-json` writes one JSON object per stderr line, and a `?token=` value never
reaches the logs, for a refused or an accepted handshake, even at the most verbose level."""

import json

from herald_client import ADMIN_KEY, expect_refusal, http_request, mint, open_ws, recv_json, run


def test_json_logs_parse_and_never_hold_the_query_token(servers, monkeypatch):
    # The most verbose filter: whatever herald can log about a handshake, it logs.
    monkeypatch.setenv("RUST_LOG", "trace")
    server = servers.start(args=("--log-json",))
    good = mint("alice", exp="default")
    # Same claims signed with the wrong secret: refused with 401.
    bad = mint("mallory", secret="not-the-project-secret-0123456789")

    async def scenario():
        await expect_refusal(server, "shop", bad, 401, "unauthorized", via="query")
        ws = await open_ws(server, "shop", good, via="query")
        _, welcome = await recv_json(ws)
        assert welcome["type"] == "welcome"
        await ws.close()

    run(scenario())
    server.stop()
    server.stopped_by_test = True
    text = server.stderr_path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, "herald logged nothing at trace level"
    for line in lines:
        event = json.loads(line)  # every line is one JSON object
        assert isinstance(event, dict) and "level" in event and "fields" in event, line
    assert any("handshake refused" in line for line in lines), text[-2000:]
    for token in (good, bad):
        # Neither the whole token nor its signature (the secret part) appears anywhere.
        assert token not in text
        assert token.rsplit(".", 1)[1] not in text


def test_text_logs_to_a_file_carry_no_colour_codes(servers):
    # stderr is a file here, as under journald or a log shipper: plain text, no ANSI escapes.
    server = servers.start()
    refused = mint("mallory", secret="not-the-project-secret-0123456789")
    run(expect_refusal(server, "shop", refused, 401, "unauthorized", via="query"))
    server.stop()
    server.stopped_by_test = True
    text = server.stderr_path.read_text(errors="replace")
    assert "handshake refused" in text
    assert "\x1b[" not in text


def test_api_error_messages_cannot_forge_log_lines(servers, monkeypatch):
    # An API error's message quotes the caller's input (here a topic with a newline); the
    # text log shows it escaped, on its own line.
    monkeypatch.setenv("RUST_LOG", "debug")
    server = servers.start()
    body = json.dumps({"project": "shop", "topic": "news\nFORGED INFO herald: all good", "data": "x"})
    r = http_request("POST", f"{server.api_url}/api/v1/publish", body.encode(),
                     {"Authorization": f"Bearer {ADMIN_KEY}", "Content-Type": "application/json"})
    assert r.status == 400, r.body
    server.stop()
    server.stopped_by_test = True
    text = server.stderr_path.read_text(errors="replace")
    errors = [line for line in text.splitlines() if "API error" in line]
    assert len(errors) == 1 and "\\nFORGED INFO" in errors[0], text[-2000:]
    assert not any(line.startswith("FORGED") for line in text.splitlines()), text[-2000:]
