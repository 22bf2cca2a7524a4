"""docs/openapi.yaml is kept true: real responses of a running server, success and error
paths, must have a status the document lists for the operation and a body matching its
schema (JSON Schema 2020-12, as OpenAPI 3.1 uses)."""

import http.client
import json
import re
import socket

import jsonschema
import yaml
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from herald_client import ADMIN_KEY, PROJECTS, REPO, client, close_all, config_toml, http_request, run



def _absolute(node):
    """`#/components/...` references made absolute (`urn:openapi#/...`), so a schema taken
    out of the document still resolves them through the registry."""
    if isinstance(node, dict):
        return {
            k: ("urn:openapi" + v if k == "$ref" and v.startswith("#") else _absolute(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_absolute(v) for v in node]
    return node


DOC = _absolute(yaml.safe_load((REPO / "docs" / "openapi.yaml").read_text()))
REGISTRY = Registry().with_resource("urn:openapi", Resource(DOC, specification=DRAFT202012))
RESOLVER = REGISTRY.resolver()


def resolve(node: dict) -> dict:
    """Follows `$ref`s (responses are referenced from paths)."""
    while "$ref" in node:
        node = RESOLVER.lookup(node["$ref"]).contents
    return node


def operation(method: str, path: str) -> dict:
    """The operation whose path template matches `path` (query stripped)."""
    bare = path.split("?", 1)[0]
    for template, item in DOC["paths"].items():
        pattern = "^" + re.sub(r"\{[^}]+\}", "[^/]+", template) + "$"
        if re.match(pattern, bare) and method.lower() in item:
            return item[method.lower()]
    raise AssertionError(f"{method} {bare} is not in docs/openapi.yaml")


def check(server, method: str, path: str, body=None, key: str | None = ADMIN_KEY, extra=None) -> int:
    """Calls the server (with `extra` headers) and checks the answer against the document;
    returns the status."""
    headers = dict(extra or {})
    data = None
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    if body is not None:
        data = (body if isinstance(body, str) else json.dumps(body)).encode()
        headers["Content-Type"] = "application/json"
    r = http_request(method, f"{server.api_url}{path}", data, headers)
    responses = operation(method, path)["responses"]
    status = str(r.status)
    assert status in responses, f"{method} {path} answered {status}, not documented: {r.body!r}"
    content = resolve(responses[status]).get("content")
    if not content:
        assert r.body == b"", f"{method} {path} {status} has an undocumented body {r.body!r}"
        return r.status
    ctype = r.headers.get("Content-Type", "").split(";")[0].strip()
    assert ctype in content, f"{method} {path} {status}: content type {ctype!r} not documented"
    if ctype == "application/json":
        validator = jsonschema.Draft202012Validator(content[ctype]["schema"], registry=REGISTRY)
        instance = json.loads(r.body)
        errors = [f"{list(e.path)}: {e.message}" for e in validator.iter_errors(instance)]
        assert not errors, f"{method} {path} {status}: {errors} in {instance}"
    return r.status


def check_raw(server, method: str, path: str, raw: bytes) -> int:
    """Sends `raw` as is (for `method path` of the document) and checks the answer."""
    host, port = server.api_listen.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(raw)
        r = http.client.HTTPResponse(s, method=method)
        r.begin()
        body = r.read()
    responses = operation(method, path)["responses"]
    status = str(r.status)
    assert status in responses, f"{method} {path} answered {status}, not documented: {body!r}"
    content = resolve(responses[status])["content"]
    ctype = (r.getheader("Content-Type") or "").split(";")[0].strip()
    assert ctype in content, f"{method} {path} {status}: content type {ctype!r} not documented"
    validator = jsonschema.Draft202012Validator(content[ctype]["schema"], registry=REGISTRY)
    errors = [e.message for e in validator.iter_errors(json.loads(body))]
    assert not errors, f"{method} {path} {status}: {errors} in {body!r}"
    return r.status


def test_malformed_requests_answer_as_documented(servers):
    """Requests refused before routing (unparsable, oversized, or a body that never comes)
    get the documented status and a JSON error body."""
    server = servers.start(
        config=config_toml(shards=1).replace("[api]\n", "[api]\nbody_read_timeout_ms = 500\n", 1))
    head = "POST /api/v1/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ADMIN_KEY + "\r\n"
    assert check_raw(server, "POST", "/api/v1/publish", (head + "Content-Length: -5\r\n\r\n").encode()) == 400
    assert check_raw(server, "POST", "/api/v1/publish",
                     (head + "Content-Length: 5\r\nContent-Length: 7\r\n\r\n").encode()) == 400
    assert check_raw(server, "GET", "/healthz", b"GET /health\xffz HTTP/1.1\r\nHost: x\r\n\r\n") == 400
    long = "GET /api/v1/connections?user=" + "a" * 100_000 + " HTTP/1.1\r\nHost: x\r\n\r\n"
    assert check_raw(server, "GET", "/api/v1/connections", long.encode()) == 414
    many = "".join(f"X-H{i}: v\r\n" for i in range(200))
    assert check_raw(server, "POST", "/api/v1/publish", (head + many + "Content-Length: 2\r\n\r\n{}").encode()) == 431
    assert check_raw(server, "POST", "/api/v1/publish", (head + "Content-Length: 100\r\n\r\n{").encode()) == 408
    assert check_raw(server, "POST", "/api/v1/publish",
                     (head + "Content-Length: 100000000000\r\n\r\n").encode()) == 413


def test_every_operation_answers_as_documented(server):
    shop_key = PROJECTS["shop"]["api_key"]
    blog_key = PROJECTS["blog"]["api_key"]

    async def scenario():
        conns = [await client(server, "alice") for _ in range(3)]
        try:
            # health
            assert check(server, "GET", "/healthz", key=None) == 200
            assert check(server, "GET", "/readyz", key=None) == 200
            # publish: success and every error path
            good = {"project": "shop", "topic": "news", "data": {"a": [1, 2]}}
            assert check(server, "POST", "/api/v1/publish", good) == 200
            assert check(server, "POST", "/api/v1/publish", {"projectId": "shop", "topics": ["a", "b"], "payload": 1}) == 200
            assert check(server, "POST", "/api/v1/publish", "not json") == 400
            assert check(server, "POST", "/api/v1/publish", good, key="wrong") == 401
            assert check(server, "POST", "/api/v1/publish", good, key=blog_key) == 403
            assert check(server, "POST", "/api/v1/publish", {**good, "project": "nope"}) == 404
            big = {**good, "data": "x" * (2 << 20)}
            assert check(server, "POST", "/api/v1/publish", big) == 413
            once = {"Idempotency-Key": "openapi-1"}
            assert check(server, "POST", "/api/v1/publish", good, extra=once) == 200
            assert check(server, "POST", "/api/v1/publish", good, extra=once) == 200
            assert check(server, "POST", "/api/v1/publish", {**good, "data": 2}, extra=once) == 422
            assert check(server, "POST", "/api/v1/publish", good, extra={"Idempotency-Key": "a b"}) == 400
            assert check(server, "POST", "/api/v1/publish/batch", [good, good]) == 200
            assert check(server, "POST", "/api/v1/publish/batch", []) == 400
            # connections
            assert check(server, "GET", "/api/v1/connections") == 200
            assert check(server, "GET", "/api/v1/connections?user=alice&limit=1", key=shop_key) == 200
            assert check(server, "GET", "/api/v1/connections?limit=0") == 400
            assert check(server, "GET", "/api/v1/connections", key="wrong") == 401
            assert check(server, "GET", "/api/v1/connections?project=shop", key=blog_key) == 403
            assert check(server, "GET", "/api/v1/connections?project=nope") == 404
            conn = conns[0][1]["conn"]
            assert check(server, "DELETE", f"/api/v1/connections/{conn}", key=blog_key) == 403
            assert check(server, "DELETE", f"/api/v1/connections/{conn}") == 204
            assert check(server, "DELETE", f"/api/v1/connections/{conn}") == 404
            assert check(server, "POST", "/api/v1/disconnect", {"project": "shop", "user": "alice"}) == 200
            assert check(server, "POST", "/api/v1/disconnect", {"project": "shop"}) == 400
            # stats and metrics
            assert check(server, "GET", "/api/v1/stats") == 200
            assert check(server, "GET", "/api/v1/stats", key=shop_key) == 403
            assert check(server, "GET", "/metrics", key=None) == 200
            # console and its tokens
            assert check(server, "GET", "/console", key=None) == 200
            assert check(server, "GET", "/console/console.js", key=None) == 200
            assert check(server, "GET", "/console/console.css", key=None) == 200
            assert check(server, "GET", "/console/nope.js", key=None) == 404
            token = "/api/v1/projects/shop/console-token"
            assert check(server, "POST", token, {"topic": "news"}) == 200
            assert check(server, "POST", token, {"topic": "news"}, key=shop_key) == 200
            assert check(server, "POST", token, {"topic": "user.alice"}) == 400
            assert check(server, "POST", token, {"topic": "news"}, key="wrong") == 401
            assert check(server, "POST", token, {"topic": "news"}, key=blog_key) == 403
            assert check(server, "POST", "/api/v1/projects/nope/console-token", {"topic": "news"}) == 404
            # projects and keys
            assert check(server, "POST", "/api/v1/projects", {"id": "fresh"}) == 201
            assert check(server, "POST", "/api/v1/projects", {"id": "fresh"}) == 409
            assert check(server, "POST", "/api/v1/projects", {"id": "other"}, key=shop_key) == 403
            key = {"alg": "HS256", "secret": "a-secret-of-enough-length-0123"}
            assert check(server, "PUT", "/api/v1/projects/shop/keys/k9", key, key=shop_key) == 204
            assert check(server, "PUT", "/api/v1/projects/shop/keys/k9", {"alg": "HS256"}) == 400
            assert check(server, "DELETE", "/api/v1/projects/shop/keys/k9?disconnect=true") == 204
            assert check(server, "DELETE", "/api/v1/projects/shop/keys/k9") == 404
            assert check(server, "GET", "/api/v1/projects") == 200
            assert check(server, "GET", "/api/v1/projects", key=shop_key) == 200
            assert check(server, "GET", "/api/v1/projects/fresh") == 200
            assert check(server, "GET", "/api/v1/projects/shop", key=shop_key) == 200
            assert check(server, "GET", "/api/v1/projects/blog", key=shop_key) == 403
            assert check(server, "GET", "/api/v1/projects/nope") == 404
            # `fresh` has no key at all: nothing to sign a console token with.
            assert check(server, "POST", "/api/v1/projects/fresh/console-token", {"topic": "news"}) == 409
            assert check(server, "GET", "/api/v1/projects", key="wrong") == 401
            r = http_request("GET", f"{server.api_url}/api/v1/projects", None,
                             {"Authorization": f"Bearer {shop_key}"})
            (shop,) = json.loads(r.body)["projects"]
            assert shop["max_token_lifetime_secs"] == 2592000, shop
            assert shop["revoked_kids"] == ["k9"], shop
            # A project's 32 keys are all in use: a new kid is 409.
            for i in range(32 - len(shop["keys"])):
                assert check(server, "PUT", f"/api/v1/projects/shop/keys/n{i}", key, key=shop_key) == 204
            assert check(server, "PUT", "/api/v1/projects/shop/keys/n99", key, key=shop_key) == 409
        finally:
            await close_all([ws for ws, _ in conns])

    run(scenario())


def test_every_documented_path_is_served(server):
    """No operation in the document is a 404 route on the server."""
    for template, item in DOC["paths"].items():
        path = re.sub(r"\{[^}]+\}", "x", template)
        for method in item:
            if method == "parameters":
                continue
            r = http_request(method.upper(), f"{server.api_url}{path}", b"{}" if method in ("post", "put") else None,
                             {"Authorization": "Bearer wrong"})
            body = r.body.decode(errors="replace")
            assert not (r.status == 404 and '"not_found"' in body and "no route" in body), (method, template, body)


def test_rate_limited_answers_as_documented(servers):
    """Every authenticated operation documents the 429 its key's request bucket answers."""
    server = servers.start(config=config_toml(
        shards=1, limits={"api_requests_per_key_per_sec": 1, "api_burst_per_key": 1}))
    good = {"project": "shop", "topic": "news", "data": 1}
    # The admin key's one token.
    assert check(server, "POST", "/api/v1/publish", good) == 200
    calls = [
        ("POST", "/api/v1/publish", good),
        ("POST", "/api/v1/publish/batch", [good]),
        ("GET", "/api/v1/connections", None),
        ("DELETE", "/api/v1/connections/0-0-0", None),
        ("POST", "/api/v1/disconnect", {"project": "shop", "user": "alice"}),
        ("GET", "/api/v1/stats", None),
        ("POST", "/api/v1/projects", {"id": "fresh"}),
        ("PUT", "/api/v1/projects/shop/keys/k9", {"alg": "HS256", "secret": "a-secret-of-enough-length-0123"}),
        ("DELETE", "/api/v1/projects/shop/keys/k9", None),
        ("GET", "/api/v1/projects", None),
        ("GET", "/api/v1/projects/shop", None),
        ("POST", "/api/v1/projects/shop/console-token", {"topic": "news"}),
    ]
    for method, path, body in calls:
        status = check(server, method, path, body)
        if status != 429:
            # A token came back (one a second) on a slow machine and this call took it.
            status = check(server, method, path, body)
        assert status == 429, (method, path, status)
    r = http_request("GET", f"{server.api_url}/api/v1/stats", None, {"Authorization": f"Bearer {ADMIN_KEY}"})
    assert r.status == 429 and int(r.headers["Retry-After"]) >= 1, (r.status, r.headers)
    assert json.loads(r.body)["error"] == "rate_limited"
    # Unauthenticated requests are 401 as documented, never 429.
    assert check(server, "GET", "/api/v1/stats", key="wrong") == 401


def test_cluster_answers_as_documented(servers, tmp_path):
    """With `[engine]`, connection management and statistics answer for the whole cluster
    (node-named ids, `nodes`, `partial`, the stats' `cluster`), as documented."""
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    redis = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        extra = f'\n[engine]\nurl = "redis://127.0.0.1:{port}/0"\nprefix = "openapi:"\nnode = "n1"\n'
        server = servers.start(config=config_toml(shards=1, extra=extra))
        deadline = time.monotonic() + 20
        while http_request("GET", f"{server.api_url}/readyz", None, {}).status != 200:
            assert time.monotonic() < deadline, "the engine never came up"
            time.sleep(0.05)

        async def scenario():
            conns = [await client(server, "alice")]
            try:
                assert check(server, "GET", "/api/v1/connections") == 200
                r = http_request("GET", f"{server.api_url}/api/v1/connections", None,
                                 {"Authorization": f"Bearer {ADMIN_KEY}"})
                listed = json.loads(r.body)
                assert listed["nodes"] == {"n1": "ok"} and listed["partial"] is False, listed
                conn = listed["connections"][0]["id"]
                assert conn.endswith("@n1"), conn
                assert check(server, "GET", "/api/v1/stats") == 200
                assert check(server, "DELETE", f"/api/v1/connections/{conn}") == 204
                assert check(server, "DELETE", "/api/v1/connections/0-0-0@elsewhere") == 404
                assert check(server, "POST", "/api/v1/disconnect", {"project": "shop", "user": "alice"}) == 200
            finally:
                await close_all([ws for ws, _ in conns])

        run(scenario())
    finally:
        redis.kill()
        redis.wait(timeout=10)
