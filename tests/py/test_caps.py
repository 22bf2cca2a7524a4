"""Connection caps (the seeds' circuit breaker): a warning in the log and in /metrics at 90%
of the server's and a project's cap, once per rise (re-armed below 80%), and 503 at the cap."""

import asyncio
import time

from herald_client import client, close_all, config_toml, expect_refusal, mint, plain_get, run


def metrics(server) -> dict[str, float]:
    r = plain_get(server.api_listen, "/metrics")
    assert r.status == 200
    out = {}
    for line in r.body.decode().splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            out[series] = float(value)
    return out


def log_count(server, text: str) -> int:
    return server.stderr_path.read_text(errors="replace").count(text)


def wait_log(server, text: str, n: int) -> None:
    deadline = time.monotonic() + 5
    while log_count(server, text) < n:
        assert time.monotonic() < deadline, f"{text!r} not logged {n}x: {server.stderr_tail()}"
        time.sleep(0.05)


SERVER_WARN = "connections at 90% of server.max_connections"
SERVER_BACK = "connections back below 80% of server.max_connections"
PROJECT_WARN = "connections at 90% of projects[].max_connections"
PROJECT_BACK = "connections back below 80% of projects[].max_connections"


def test_ninety_percent_warns_once_per_rise_and_the_cap_refuses_503(servers):
    text = config_toml().replace("[server]\n", "[server]\nmax_connections = 20\n", 1)
    text = text.replace('id = "shop"\n', 'id = "shop"\nmax_connections = 10\n', 1)
    server = servers.start(config=text)
    m = metrics(server)
    assert m["herald_connection_cap"] == 20
    assert m['herald_project_connection_cap{project="shop"}'] == 10
    assert m['herald_project_connection_cap{project="blog"}'] == 0
    assert m["herald_connections_near_cap"] == 0

    async def scenario():
        shop = [(await client(server, f"s{i}", "shop"))[0] for i in range(8)]
        m = metrics(server)
        assert m['herald_project_connections_near_cap{project="shop"}'] == 0
        assert log_count(server, PROJECT_WARN) == 0
        # The 9th of 10: the project is at 90%.
        shop.append((await client(server, "s8", "shop"))[0])
        wait_log(server, PROJECT_WARN, 1)
        m = metrics(server)
        assert m['herald_project_connections_near_cap{project="shop"}'] == 1
        assert m['herald_project_connections_near_cap{project="blog"}'] == 0
        assert m["herald_connections_near_cap"] == 0
        # The 10th: still near, not logged again; the 11th is refused.
        shop.append((await client(server, "s9", "shop"))[0])
        await expect_refusal(server, "shop", mint("s10", "shop"), 503, "at_capacity")
        # The server: 10 + 8 blog = 18 of 20 is 90%.
        blog = [(await client(server, f"b{i}", "blog"))[0] for i in range(8)]
        wait_log(server, SERVER_WARN, 1)
        assert metrics(server)["herald_connections_near_cap"] == 1
        blog += [(await client(server, f"b{i}", "blog"))[0] for i in range(8, 10)]
        await expect_refusal(server, "blog", mint("b10", "blog"), 503, "at_capacity")
        # Down to 8 of 10 in shop (80%: not yet re-armed), then 7 (re-armed).
        await close_all(shop[:2])
        await asyncio.sleep(0.3)
        assert log_count(server, PROJECT_BACK) == 0
        await close_all(shop[2:3])
        wait_log(server, PROJECT_BACK, 1)
        # Up again to 9: warned a second time.
        shop[:3] = [(await client(server, f"t{i}", "shop"))[0] for i in range(2)]
        wait_log(server, PROJECT_WARN, 2)
        # The server: 19 of 20 -> close 10 blog -> 9 of 20, below 80%.
        await close_all(blog)
        wait_log(server, SERVER_BACK, 1)
        m = metrics(server)
        assert m["herald_connections_near_cap"] == 0
        assert m['herald_project_connections_near_cap{project="shop"}'] == 1
        await close_all(shop)
        assert log_count(server, SERVER_WARN) == 1
        assert log_count(server, PROJECT_WARN) == 2

    run(scenario())
