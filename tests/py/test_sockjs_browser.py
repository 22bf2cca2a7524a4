"""The Spring push center's browser code path in headless Chromium: a page served here loads
`sockjs-client` and `@stomp/stompjs` from tests/js/node_modules (`npm ci --prefix tests/js`),
connects with `new SockJS(<herald>/sockjs?token=...&projectId=...)` and `Stomp.over(socket)`,
subscribes, and shows a message published with the HTTP API, byte for byte."""

from __future__ import annotations

import asyncio
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from herald_client import REPO, apublish, mint, run
from test_console import browser, by_id, await_page  # noqa: F401  (the Chromium fixture)

JS = REPO / "tests" / "js"
#: What the page server serves: URL path → file.
FILES = {
    "/": JS / "sockjs_page" / "index.html",
    "/sockjs.min.js": JS / "node_modules" / "sockjs-client" / "dist" / "sockjs.min.js",
    "/stomp.umd.min.js": JS / "node_modules" / "@stomp" / "stompjs" / "bundles" / "stomp.umd.min.js",
}


@pytest.fixture
def page_server():
    """Serves the page and the two npm packages' browser builds on its own port (another
    origin than herald's: sockjs-client's /info request is a CORS one)."""
    missing = [str(p) for p in FILES.values() if not p.is_file()]
    if missing:
        pytest.fail(f"not installed: {missing}: npm ci --prefix tests/js", pytrace=False)

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802  (the http.server name)
            path = FILES.get(self.path.split("?", 1)[0])
            if path is None:
                self.send_error(404)
                return
            body = path.read_bytes()
            self.send_response(200)
            kind = "text/html" if path.suffix == ".html" else "application/javascript"
            self.send_header("Content-Type", f"{kind}; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    thread.join(timeout=5)


def test_the_seed_page_connects_through_sockjs_and_shows_a_published_message(
    server, page_server, browser  # noqa: F811
):
    herald = f"http://{server.listen}"

    async def go():
        browser.get(f"{page_server}/?herald={herald}&token={mint('alice')}&projectId=shop")
        await await_page(
            browser,
            "the subscription's receipt",
            lambda d: by_id(d, "status").text == "subscribed via websocket",
        )
        data = '{"title": "caf\u00e9 \\"open\\"", "n": [1, 2.50]}'
        await apublish(server, f'{{"project":"shop","topic":"news","data":{data}}}')
        await await_page(browser, "the message", lambda d: by_id(d, "out").text == data)
        assert browser.execute_script("return document.getElementById('out').textContent") == data

    run(go())
