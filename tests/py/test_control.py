"""Connection management over the API, seen by an independent client: list, kick (4003),
disconnect a user (4003 on each), stats."""

import json

from herald_client import (
    ADMIN_KEY,
    PROJECTS,
    assert_error_body,
    client,
    close_all,
    expect_close,
    http_request,
    request,
    run,
    subscribe,
)


def api(server, method, path, body=None, key=ADMIN_KEY):
    headers = {"Authorization": f"Bearer {key}"}
    data = None
    if body is not None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        headers["Content-Type"] = "application/json"
    return http_request(method, f"{server.api_url}{path}", data, headers)


def test_list_filters_and_pages(server):
    async def scenario():
        conns = [await client(server, "alice") for _ in range(5)]
        bob, bob_w = await client(server, "bob")
        await subscribe(bob, "news")
        carol, carol_w = await client(server, "carol", "blog")
        try:
            r = api(server, "GET", "/api/v1/connections")
            assert r.status == 200, r.body
            listing = r.json()
            assert listing["next_cursor"] is None
            ids = [c["id"] for c in listing["connections"]]
            assert set(ids) == {w["conn"] for _, w in conns} | {bob_w["conn"], carol_w["conn"]}
            entry = next(c for c in listing["connections"] if c["id"] == bob_w["conn"])
            assert set(entry) == {"id", "project", "user", "ip", "connected_at", "topics"}
            assert entry["project"] == "shop" and entry["user"] == "bob"
            assert entry["topics"] == ["all", "user.bob", "news"]

            r = api(server, "GET", "/api/v1/connections?topic=news")
            assert [c["id"] for c in r.json()["connections"]] == [bob_w["conn"]]
            r = api(server, "GET", "/api/v1/connections?user=alice&project=shop")
            assert {c["id"] for c in r.json()["connections"]} == {w["conn"] for _, w in conns}
            r = api(server, "GET", "/api/v1/connections", key=PROJECTS["blog"]["api_key"])
            assert [c["id"] for c in r.json()["connections"]] == [carol_w["conn"]]
            r = api(server, "GET", "/api/v1/connections?project=shop", key=PROJECTS["blog"]["api_key"])
            assert r.status == 403
            assert_error_body(r.body, "forbidden")

            seen, cursor = [], ""
            while True:
                r = api(server, "GET", f"/api/v1/connections?project=shop&limit=2&cursor={cursor}")
                page = r.json()
                assert len(page["connections"]) <= 2
                seen += [c["id"] for c in page["connections"]]
                if page["next_cursor"] is None:
                    break
                cursor = page["next_cursor"]
            assert len(seen) == len(set(seen)) == 6

            r = api(server, "GET", "/api/v1/connections?limit=0")
            assert r.status == 400
            assert_error_body(r.body, "bad_request")
        finally:
            await close_all([ws for ws, _ in conns] + [bob, carol])

    run(scenario())


def test_kick_and_stale_id(server):
    async def scenario():
        ws, w = await client(server, "dave")
        other, _ = await client(server, "erin")
        r = api(server, "DELETE", f"/api/v1/connections/{w['conn']}", key=PROJECTS["blog"]["api_key"])
        assert r.status == 403, r.body
        r = api(server, "DELETE", f"/api/v1/connections/{w['conn']}", key=PROJECTS["shop"]["api_key"])
        assert r.status == 204, r.body
        await expect_close(ws, 4003)
        r = api(server, "DELETE", f"/api/v1/connections/{w['conn']}")
        assert r.status == 404
        assert_error_body(r.body, "not_found")
        assert (await request(other, {"op": "ping", "id": 1}))["type"] == "pong"
        await other.close()

    run(scenario())


def test_disconnect_user(server):
    async def scenario():
        frank = [await client(server, "frank") for _ in range(4)]
        grace, _ = await client(server, "grace")
        r = api(server, "POST", "/api/v1/disconnect", {"project": "shop", "user": "frank"})
        assert r.status == 200, r.body
        assert r.json() == {"disconnected": 4}
        for ws, _ in frank:
            await expect_close(ws, 4003)
        assert (await request(grace, {"op": "ping", "id": 1}))["type"] == "pong"
        await grace.close()

    run(scenario())


def test_stats(server):
    async def scenario():
        conns = [await client(server, "hank") for _ in range(3)]
        r = api(server, "GET", "/api/v1/stats")
        assert r.status == 200, r.body
        stats = r.json()
        assert stats["connections"] == 3
        assert sum(s["connections"] for s in stats["shards"]) == 3
        assert len(stats["shards"]) == 2
        assert stats["projects"]["shop"]["connections"] == 3
        assert stats["projects"]["blog"]["connections"] == 0
        r = api(server, "GET", "/api/v1/stats", key=PROJECTS["shop"]["api_key"])
        assert r.status == 403
        await close_all([ws for ws, _ in conns])

    run(scenario())
