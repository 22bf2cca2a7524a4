"""SIGHUP re-reads the config file. Keys and projects change without dropping any
connection; a bad file is refused with a log line and the old settings stay."""

from __future__ import annotations

import asyncio
import signal

from herald_client import apublish, expect_refusal, http_request, run
from keytools import (
    connect_ok,
    each_gets_one,
    make_key,
    project_toml,
    refused_401,
    server_toml,
    wait_for_log,
    wait_until_accepted,
)


def test_sighup_reload(servers):
    k1, k2, k3, blog_k = make_key("HS256"), make_key("ES256"), make_key("EdDSA"), make_key("RS256")

    def config(*keys, extra=""):
        return server_toml(
            project_toml("hup", keys="".join(k.config_toml(kid) for kid, k in keys)) + extra
        )

    server = servers.start(config=config(("k1", k1)))
    cfg_path = server.stderr_path.parent / "herald.toml"

    def hup(text: str) -> int:
        """Writes the config file, sends SIGHUP; returns the stderr offset before it."""
        offset = server.stderr_path.stat().st_size
        cfg_path.write_text(text)
        server.proc.send_signal(signal.SIGHUP)
        return offset

    async def go():
        before, _ = await connect_ok(server, "hup", k1.token("ivy", kid="k1"), "ivy")
        conns = [before]
        try:
            await refused_401(server, "hup", k2.token("ivy", kid="k2"))

            # 1. Add k2 and a new project `blog`.
            off = hup(config(("k1", k1), ("k2", k2), extra=project_toml("blog", keys=blog_k.config_toml("b"))))
            ws, _ = await wait_until_accepted(server, "hup", k2.token("ivy", kid="k2"), "ivy")
            conns.append(ws)
            wait_for_log(server, "reloaded", after=off)
            ws, _ = await connect_ok(server, "blog", blog_k.token("ivy", kid="b"), "ivy")
            conns.append(ws)
            mid = await apublish(server, {"project": "hup", "topic": "all", "data": 1})
            await each_gets_one(conns[:2], "all", 1, mid)

            # 2. Broken files: bad TOML, an unknown key, a malformed PEM, a JWKS without kid.
            broken = [
                "[[projects]\nid = ",
                config(("k1", k1)) + "\nno_such_setting = 1\n",
                config(("k1", k1))
                + '\n[[projects.keys]]\nkid = "bad"\nalg = "ES256"\n'
                'pem = "-----BEGIN PUBLIC KEY-----\\nAAAA\\n-----END PUBLIC KEY-----\\n"\n',
                config(("k1", k1)).replace(
                    'id = "hup"\n',
                    'id = "hup"\njwks = \'{"keys":[{"kty":"OKP","crv":"Ed25519",'
                    '"x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}\'\n',
                ),
            ]
            for text in broken:
                off = hup(text)
                log = wait_for_log(server, "reload refused", after=off)
                assert "old settings stay" in log, log
                assert server.proc.poll() is None, "herald exited on a bad config"
                # Old settings: k1 and k2 both still verify, blog still exists.
                for key, kid in ((k1, "k1"), (k2, "k2")):
                    ws, _ = await connect_ok(server, "hup", key.token("ivy", kid=kid), "ivy")
                    await ws.close()
                ws, _ = await connect_ok(server, "blog", blog_k.token("ivy", kid="b"), "ivy")
                await ws.close()
            r = await asyncio.to_thread(http_request, "GET", f"{server.api_url}/healthz")
            assert r.status == 200, r.status

            # 3. Drop k1, add k3: k1 is refused for new handshakes, while the connection opened
            # with it before any reload is not dropped and still receives.
            hup(config(("k2", k2), ("k3", k3)))
            ws, _ = await wait_until_accepted(server, "hup", k3.token("ivy", kid="k3"), "ivy")
            conns.append(ws)
            await refused_401(server, "hup", k1.token("ivy", kid="k1"))
            # `blog` left the config: its handshakes are 404 now.
            await expect_refusal(server, "blog", blog_k.token("ivy", kid="b"), 404, "unknown_project")
            mid = await apublish(server, {"project": "hup", "topic": "all", "data": 2})
            hup_conns = [conns[0], conns[1], conns[3]]
            await each_gets_one(hup_conns, "all", 2, mid)
            assert all(ws.close_code is None for ws in hup_conns)
        finally:
            await asyncio.gather(*(ws.close() for ws in conns), return_exceptions=True)

    run(go(), timeout=40)


def test_sighup_disables_a_project_without_dropping_its_connections(servers):
    """`enabled = false` by reload: new handshakes are 403, connections already open stay and
    keep receiving; `enabled = true` again lets new ones in."""
    key = make_key("ES256")

    def config(enabled: bool) -> str:
        return server_toml(project_toml("hup", enabled=enabled, keys=key.config_toml("k")))

    server = servers.start(config=config(True))
    cfg_path = server.stderr_path.parent / "herald.toml"

    async def go():
        ws, _ = await connect_ok(server, "hup", key.token("joe", kid="k"), "joe")
        try:
            cfg_path.write_text(config(False))
            server.proc.send_signal(signal.SIGHUP)
            wait_for_log(server, "reloaded")
            await expect_refusal(server, "hup", key.token("joe", kid="k"), 403, "forbidden")
            mid = await apublish(server, {"project": "hup", "topic": "user.joe", "data": [1]})
            await each_gets_one([ws], "user.joe", [1], mid)
            off = server.stderr_path.stat().st_size
            cfg_path.write_text(config(True))
            server.proc.send_signal(signal.SIGHUP)
            wait_for_log(server, "reloaded", after=off)
            ws2, _ = await connect_ok(server, "hup", key.token("joe", kid="k"), "joe")
            await ws2.close()
        finally:
            await ws.close()

    run(go(), timeout=20)


def test_sighup_with_an_unchanged_file_claims_no_restart_only_change(servers):
    """The file is re-read as it was: the log must not claim that [server]/[ws] settings
    changed (herald was started with --listen/--api-listen/--state-dir flags, which override
    the file and are not changes)."""
    key = make_key("HS256")
    server = servers.start(config=server_toml(project_toml("hup", keys=key.config_toml("k"))))
    server.proc.send_signal(signal.SIGHUP)
    log = wait_for_log(server, "reloaded")
    assert "needs a restart" not in log, log
