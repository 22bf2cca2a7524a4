"""`GET /metrics` speaks both text formats, chosen by `Accept`: the Prometheus text format
0.0.4 passes `promtool check metrics` (the Prometheus project's own linter), the OpenMetrics
answer parses under a strict OpenMetrics parser; every family has help text in both."""

import os
import shutil
import subprocess

import pytest
from prometheus_client.openmetrics.parser import text_string_to_metric_families

from herald_client import client, close_all, plain_get, publish, run

PROMTOOL = shutil.which("promtool")


def promtool() -> str:
    """promtool's path; without it the test fails under CI and is skipped (loudly) elsewhere."""
    if PROMTOOL is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is not installed (apt: prometheus); .ci/run installs it")
        pytest.skip("SKIPPED, NOT TESTED: promtool is not installed (apt-get install prometheus)")
    return PROMTOOL


def scrape(server, accept: str | None):
    headers = {"Accept": accept} if accept is not None else {}
    r = plain_get(server.api_listen, "/metrics", headers)
    assert r.status == 200, r.body
    return r


def with_traffic(server):
    """Some connections and messages, so every family has samples."""

    async def scenario():
        conns = [await client(server, "alice") for _ in range(2)]
        publish(server, {"project": "shop", "topic": "news", "data": 1})
        await close_all([ws for ws, _ in conns])

    run(scenario())


@pytest.mark.parametrize("accept", ["text/plain;version=0.0.4", "text/plain"])
def test_prometheus_text_passes_promtool(server, accept):
    tool = promtool()
    with_traffic(server)
    r = scrape(server, accept)
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = r.body.decode()
    assert "# EOF" not in text
    assert "# HELP herald_handshakes_total " in text, text[:2000]
    assert "# TYPE herald_handshakes_total counter" in text
    check = subprocess.run([tool, "check", "metrics"], input=r.body, capture_output=True, timeout=60)
    assert check.returncode == 0 and not check.stdout and not check.stderr, (
        check.returncode, check.stdout.decode(), check.stderr.decode())


@pytest.mark.parametrize("accept", [None, "application/openmetrics-text; version=1.0.0",
                                    "application/openmetrics-text;version=1.0.0,"
                                    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"])
def test_openmetrics_parses_strictly_with_help_everywhere(server, accept):
    with_traffic(server)
    r = scrape(server, accept)
    assert r.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = r.body.decode()
    assert text.endswith("# EOF\n")
    families = list(text_string_to_metric_families(text))
    assert len(families) >= 15, [f.name for f in families]
    for f in families:
        assert f.documentation.strip(), f"{f.name} has no help text"
    names = {f.name: f.type for f in families}
    assert names["herald_handshakes"] == "counter"
    assert names["herald_publish_enqueue_seconds"] == "histogram"
