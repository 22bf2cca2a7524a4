"""Key rotation with two live kids, revocation with and without disconnect,
persistence of API changes across a restart of the real process, and isolation between two
projects with the same topic, user and kid."""

from __future__ import annotations

import asyncio
import json
import signal

from herald_client import (
    apublish,
    close_all,
    expect_close,
    expect_silence,
    publish_raw,
    recv_json,
    run,
    subscribe,
)
from keytools import (
    assert_status,
    connect_ok,
    each_gets_one,
    open_many,
    create_project,
    delete_key,
    make_key,
    project_toml,
    put_key,
    refused_401,
    restart,
    server_toml,
)


def test_rotation_and_revocation(servers):
    """Project `rot` has kids `a` (HS256) and `b` (ES256); project `other` also has a kid `b`
    (another key). Both kids of `rot` are live at once. Deleting `a` without disconnect keeps
    its connections (they go on receiving) and refuses new `a` handshakes. Deleting `b` with
    `?disconnect=true` closes exactly `b`'s connections with 4003 on every shard, while the
    `a` connections, those of a kid `c` added through the API, and `other`'s `b` connection
    keep receiving."""
    a, b, c, other_b = make_key("HS256"), make_key("ES256"), make_key("EdDSA"), make_key("ES256")
    config = server_toml(
        project_toml("rot", keys=a.config_toml("a") + b.config_toml("b"))
        + project_toml("other", keys=other_b.config_toml("b"))
    )
    server = servers.start(config=config)

    async def go():
        conns_a = await open_many(server, "rot", a, "a", "ua", 4)
        # 8 connections: over 2 SO_REUSEPORT shards they almost surely land on both.
        conns_b = await open_many(server, "rot", b, "b", "ub", 8)
        (conn_o, _) = await connect_ok(server, "other", other_b.token("ub0", kid="b"), "ub0")
        conns_c = []
        try:
            mid = await apublish(server, {"project": "rot", "topic": "all", "data": 1})
            await each_gets_one(conns_a + conns_b, "all", 1, mid)
            await expect_silence(conn_o)

            # Revoke `a` without disconnect.
            assert_status(await asyncio.to_thread(delete_key, server, "rot", "a"), 204)
            await refused_401(server, "rot", a.token("ua9", kid="a"))
            await refused_401(server, "rot", a.token("ua9", kid=None))
            ws, _ = await connect_ok(server, "rot", b.token("ub9", kid="b"), "ub9")
            await ws.close()
            mid = await apublish(server, {"project": "rot", "topic": "all", "data": 2})
            await each_gets_one(conns_a + conns_b, "all", 2, mid)
            for ws in conns_a:
                assert ws.close_code is None, "a connection of the revoked key was closed"
            # The kid is gone: deleting it again is 404 not_found.
            assert_status(
                await asyncio.to_thread(delete_key, server, "rot", "a"), 404, "not_found"
            )

            # Rotate in `c` through the API.
            assert_status(await asyncio.to_thread(put_key, server, "rot", "c", c.spec()), 204)
            conns_c = await open_many(server, "rot", c, "c", "uc", 2)

            # Revoke `b` with disconnect.
            r = await asyncio.to_thread(delete_key, server, "rot", "b", True)
            assert_status(r, 204)
            before = await asyncio.gather(*(expect_close(ws, 4003) for ws in conns_b))
            assert before == [[]] * len(conns_b), f"frames before the 4003 close: {before!r}"
            await refused_401(server, "rot", b.token("ub0", kid="b"))

            mid = await apublish(server, {"project": "rot", "topic": "all", "data": 3})
            survivors = conns_a + conns_c
            await each_gets_one(survivors, "all", 3, mid)
            assert len(survivors) == 6

            # The same kid in the other project was not touched.
            mid = await apublish(server, {"project": "other", "topic": "all", "data": 4})
            await each_gets_one([conn_o], "all", 4, mid)
            ws, _ = await connect_ok(server, "other", other_b.token("ub1", kid="b"), "ub1")
            await ws.close()
        finally:
            await close_all(conns_a + conns_b + conns_c + [conn_o])

    run(go(), timeout=40)


def test_api_changes_persist_across_a_restart(servers):
    """Create a project and PUT keys through the API, delete a config key and replace another
    config key by PUT; after a SIGTERM and a new process on the same --state-dir, all of it is
    still in force."""
    k1 = make_key("HS256")
    cfg_del = make_key("RS256")
    cfg_replaced = make_key("ES256")
    config = server_toml(
        project_toml(
            "shop",
            api_key="shop-api-key-0123456789",
            keys=k1.config_toml("k1") + cfg_del.config_toml("gone") + cfg_replaced.config_toml("rep"),
        )
    )
    server = servers.start(config=config)
    fresh_f1 = make_key("HS384")
    fresh_f2 = make_key("ES384")
    shop_ed = make_key("EdDSA")
    rep_new = make_key("ES256")

    r = create_project(
        server,
        {
            "id": "fresh",
            "api_key": "fresh-api-key-0123456789",
            "keys": [{"kid": "f1", **fresh_f1.spec()}],
        },
    )
    assert r.status == 201, (r.status, r.body)
    assert r.json() == {"id": "fresh"}
    assert_status(put_key(server, "fresh", "f2", fresh_f2.jwk("f2", with_alg=False)), 204)
    assert_status(put_key(server, "shop", "api-ed", shop_ed.spec()), 204)
    assert_status(put_key(server, "shop", "rep", rep_new.spec()), 204)
    assert_status(delete_key(server, "shop", "gone"), 204)

    async def check(srv):
        for project, key, kid in (
            ("fresh", fresh_f1, "f1"),
            ("fresh", fresh_f2, "f2"),
            ("shop", shop_ed, "api-ed"),
            ("shop", rep_new, "rep"),
            ("shop", k1, "k1"),
        ):
            ws, welcome = await connect_ok(srv, project, key.token("pat", kid=kid), "pat")
            await ws.close()
        await refused_401(srv, "shop", cfg_del.token("pat", kid="gone"))
        await refused_401(srv, "shop", cfg_del.token("pat", kid=None))
        await refused_401(srv, "shop", cfg_replaced.token("pat", kid="rep"))

    run(check(server), timeout=20)

    server = restart(servers, server)
    run(check(server), timeout=20)

    # The project exists (409), its API key works, and it stays isolated from shop.
    r = create_project(server, {"id": "fresh", "keys": []})
    assert_status(r, 409, "conflict")

    async def deliver():
        ws, _ = await connect_ok(server, "fresh", fresh_f1.token("pat", kid="f1"), "pat")
        shop_ws, _ = await connect_ok(server, "shop", k1.token("pat", kid="k1"), "pat")
        try:
            mid = await apublish(
                server, {"project": "fresh", "topic": "user.pat", "data": "hi"},
                key="fresh-api-key-0123456789",
            )
            await each_gets_one([ws], "user.pat", "hi", mid)
            await expect_silence(shop_ws)
        finally:
            await close_all([ws, shop_ws])

    run(deliver(), timeout=20)

    # A change acknowledged with 204 is durable: it survives a crash (SIGKILL) right after.
    late = make_key("PS512")
    assert_status(put_key(server, "shop", "late", late.spec()), 204)
    assert_status(delete_key(server, "shop", "api-ed"), 204)
    server = restart(servers, server, sig=signal.SIGKILL)

    async def after_crash():
        ws, _ = await connect_ok(server, "shop", late.token("pat", kid="late"), "pat")
        await ws.close()
        await refused_401(server, "shop", shop_ed.token("pat", kid="api-ed"))
        ws, _ = await connect_ok(server, "fresh", fresh_f2.token("pat", kid="f2"), "pat")
        await ws.close()

    run(after_crash(), timeout=20)
    r = publish_raw(
        server,
        json.dumps({"project": "shop", "topic": "x", "data": 1}),
        key="fresh-api-key-0123456789",
    )
    assert_status(r, 403, "forbidden")


def test_two_projects_same_topic_same_user_same_kid_are_isolated(servers):
    """Projects `north` and `south`: same kid `k`, user `42`, topic `news`, client publishing
    enabled. Broadcast, multicast, unicast and client publishes of one never reach the other."""
    keys = {"north": make_key("ES256"), "south": make_key("ES256")}
    config = server_toml(
        "".join(
            project_toml(p, allow_client_publish=True, keys=k.config_toml("k"))
            for p, k in keys.items()
        )
    )
    server = servers.start(config=config)

    async def go():
        conns = {}
        try:
            for p, k in keys.items():
                conns[p] = [
                    (await connect_ok(server, p, k.token("42", kid="k"), "42"))[0] for _ in range(2)
                ]
                for i, ws in enumerate(conns[p]):
                    await subscribe(ws, "news", rid=i)
            everyone = conns["north"] + conns["south"]
            for p, other in (("north", "south"), ("south", "north")):
                for topic in ("news", "all", "user.42"):
                    data = {"from": p, "topic": topic}
                    mid = await apublish(server, {"project": p, "topic": topic, "data": data})
                    await asyncio.gather(
                        each_gets_one(conns[p], topic, data, mid),
                        *(expect_silence(ws) for ws in conns[other]),
                    )
                # A client publish stays in its project too.
                sender = conns[p][0]
                await sender.send(json.dumps({"op": "publish", "topic": "news", "data": p, "id": "x"}))
                frames = []
                for ws in conns[p]:
                    # The sender gets its ack and its own copy (it is subscribed), in any order.
                    want = 2 if ws is sender else 1
                    for _ in range(want):
                        frames.append((ws, (await recv_json(ws))[1]))
                for ws, f in frames:
                    if f.get("type") == "ack":
                        assert ws is sender and f == {"type": "ack", "id": "x"}, f
                    else:
                        assert f["type"] == "message" and f["topic"] == "news" and f["data"] == p, f
                assert sum(f.get("type") == "message" for _, f in frames) == 2
                await asyncio.gather(*(expect_silence(ws) for ws in everyone))
        finally:
            await close_all([ws for cs in conns.values() for ws in cs])

    run(go(), timeout=40)


def test_project_api_key_manages_only_its_own_project(servers):
    """A project's API key may PUT/DELETE keys of its own project (204) but not another's
    (403), nor create projects (403); no key is 401."""
    shop_k, blog_k = make_key("HS256"), make_key("HS256")
    config = server_toml(
        project_toml("shop", api_key="shop-api-key-0123456789", keys=shop_k.config_toml("k1"))
        + project_toml("blog", api_key="blog-api-key-0123456789", keys=blog_k.config_toml("k1"))
    )
    server = servers.start(config=config)
    shop_key = "shop-api-key-0123456789"
    es = make_key("ES256")
    assert_status(put_key(server, "shop", "es", es.spec(), key=shop_key), 204)
    assert_status(put_key(server, "blog", "es", es.spec(), key=shop_key), 403, "forbidden")
    assert_status(delete_key(server, "blog", "k1", key=shop_key), 403, "forbidden")
    assert_status(put_key(server, "shop", "x", es.spec(), key=None), 401, "unauthorized")
    assert_status(put_key(server, "shop", "x", es.spec(), key="wrong-key"), 401, "unauthorized")
    assert_status(
        create_project(server, {"id": "mine", "keys": []}, key=shop_key), 403, "forbidden"
    )

    async def go():
        ws, _ = await connect_ok(server, "shop", es.token("u", kid="es"), "u")
        await ws.close()
        await refused_401(server, "blog", es.token("u", kid="es"))
        ws, _ = await connect_ok(server, "blog", blog_k.token("u", kid="k1"), "u")
        await ws.close()

    run(go(), timeout=20)
    assert_status(delete_key(server, "shop", "es", key=shop_key), 204)
    run(refused_401(server, "shop", es.token("u", kid="es")), timeout=20)

