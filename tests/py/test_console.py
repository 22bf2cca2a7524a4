"""The operator console at /console, driven in headless Chromium (Debian's `chromium` and
`chromium-driver`, through Selenium) against the real binary: sign-in with the admin key and
with a project key, the connection list, kick, publish, live tail, errors shown as the API
words them. A screenshot of every view is saved under SCREENSHOTS (printed in the output)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import pytest
from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.support.ui import Select, WebDriverWait

from herald_client import (
    ADMIN_KEY,
    PROJECTS,
    REPO,
    client,
    close_all,
    config_toml,
    expect_close,
    http_request,
    recv_json,
    run,
    subscribe,
)

#: Where the screenshots go (a CI artifact path).
SCREENSHOTS = REPO / "target" / "console-screenshots"
#: Seconds any state of the page may take to show (the shared CI machine is slow).
WAIT = 20.0


def _binary(*names: str) -> str:
    for n in names:
        found = shutil.which(n)
        if found:
            return found
    pytest.fail(
        f"none of {names} is installed: apt-get install -y chromium chromium-driver (.ci/run does)",
        pytrace=False,
    )


@pytest.fixture(scope="module", autouse=True)
def announce_screenshots(request):
    """Names the screenshot folder in the test output, passing or not (a CI artifact path)."""
    yield
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    if reporter is not None and capture is not None and SCREENSHOTS.is_dir():
        names = sorted(p.name for p in SCREENSHOTS.glob("*.png"))
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\nconsole screenshots in {SCREENSHOTS}: {', '.join(names)}")


@pytest.fixture
def browser():
    opts = Options()
    opts.binary_location = _binary("chromium", "chromium-browser")
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,900",
        "--no-first-run",
    ):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(_binary("chromedriver")), options=opts)
    driver.set_page_load_timeout(WAIT)
    yield driver
    driver.quit()


def shot(driver: WebDriver, name: str) -> Path:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    driver.save_screenshot(str(path))
    print(f"console screenshot: {path}")
    return path


def wait(driver: WebDriver, what: str, cond, timeout: float = WAIT):
    """Waits until `cond(driver)` is truthy; fails naming `what` and the browser's log."""
    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: cond(d))
    except Exception as e:
        try:
            logs = driver.get_log("browser")
        except WebDriverException:
            logs = []
        failed = shot(driver, "failed")
        raise AssertionError(
            f"waited {timeout}s for {what}; page text: {driver.find_element(By.TAG_NAME, 'main').text!r}; "
            f"browser log: {logs!r}; screenshot {failed}"
        ) from e


async def await_page(driver: WebDriver, what: str, cond, timeout: float = WAIT):
    """`wait` on a thread, so the test's WebSocket clients keep running meanwhile."""
    return await asyncio.to_thread(wait, driver, what, cond, timeout)


def by_id(driver: WebDriver, id_: str):
    return driver.find_element(By.ID, id_)


def visible_text(driver: WebDriver, id_: str) -> str:
    e = by_id(driver, id_)
    return e.text if e.is_displayed() else ""


def sign_in(driver: WebDriver, server, key: str) -> None:
    driver.get(f"{server.api_url}/console")
    field = wait(driver, "the sign-in form", lambda d: by_id(d, "key"))
    field.send_keys(key)
    by_id(driver, "signin-form").submit()
    wait(driver, "the signed-in navigation", lambda d: by_id(d, "nav").is_displayed())
    # The key is in this tab's session storage, never in the URL.
    assert key not in driver.current_url
    assert driver.execute_script("return sessionStorage.getItem('herald.console.key')") == key


def open_view(driver: WebDriver, view: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"nav button[data-view='{view}']").click()
    wait(driver, f"the {view} view", lambda d: by_id(d, f"view-{view}").is_displayed())


def row_ids(driver: WebDriver, table: str, attr: str) -> list[str]:
    # Read in one script: the page replaces rows as listings arrive.
    return driver.execute_script(
        "return [...document.querySelectorAll(arguments[0])].map((r) => r.getAttribute(arguments[1]))",
        f"#{table} tbody tr",
        attr,
    )


def list_connections(driver: WebDriver) -> None:
    driver.find_element(By.CSS_SELECTOR, "#conn-filter button[type=submit]").click()


def confirm(driver: WebDriver) -> None:
    wait(driver, "the confirmation dialog", lambda d: by_id(d, "confirm").is_displayed())
    by_id(driver, "confirm-ok").click()


def test_admin_key_sees_kicks_publishes_and_tails(server, browser):
    async def scenario():
        sign_in(browser, server, ADMIN_KEY)
        assert by_id(browser, "who-name").text == "admin key"

        # Overview: the engine state and live charts from /metrics.
        await await_page(browser, "engine state `ready`", lambda d: by_id(d, "engine").text == "ready")
        await await_page(
            browser,
            "the handshake and message charts (two samples)",
            lambda d: d.find_elements(By.CSS_SELECTOR, "li[data-series='publishes/s']"),
        )
        captions = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "figcaption")]
        assert captions == [
            "Connections",
            "Handshakes per second, by outcome",
            "Messages per second",
            "Slow-consumer closes per second",
            "Shard inbox depth",
        ], captions
        shot(browser, "overview")

        # Projects: both, with their keys (kid, alg, kind, where from), no secret anywhere.
        open_view(browser, "projects")
        await await_page(
            browser, "both projects", lambda d: row_ids(d, "projects-table", "data-project") == ["blog", "shop"]
        )
        page = browser.page_source
        for p in PROJECTS.values():
            assert p["secret"] not in page and p["api_key"] not in page
        shop_row = browser.find_element(By.CSS_SELECTOR, "tr[data-project='shop']").text
        assert "k1 · HS256 · hmac · config" in shop_row and "enabled" in shop_row, shop_row
        shot(browser, "projects")

        # Connections: the test's client appears, is kicked, and receives 4003.
        ws, welcome = await client(server, "kick-me", "shop")
        conn = welcome["conn"]
        open_view(browser, "connections")
        await await_page(browser, f"connection {conn} listed", lambda d: conn in row_ids(d, "connections-table", "data-conn"))
        row = browser.find_element(By.CSS_SELECTOR, f"tr[data-conn='{conn}']")
        cells = [c.text for c in row.find_elements(By.TAG_NAME, "td")]
        assert cells[:5] == [conn, "shop", "kick-me", "all, user.kick-me", "127.0.0.1"], cells
        assert cells[5].endswith(" s") or cells[5].endswith(" min"), cells
        shot(browser, "connections")
        row.find_element(By.CSS_SELECTOR, "button[data-action='kick']").click()
        confirm(browser)
        await expect_close(ws, 4003, timeout=WAIT)
        await await_page(
            browser, "the kick's notice", lambda d: visible_text(d, "connections-notice") == f"Closed connection {conn} (4003)."
        )
        assert conn not in row_ids(browser, "connections-table", "data-conn")

        # A new listing (counted by the page, so not the page's state after the kick) comes
        # from the server without it (the server may take a moment to let the socket go).
        def relisted_without_it(d):
            listed = int(by_id(d, "connections-table").get_attribute("data-listings"))
            list_connections(d)
            wait(d, "a new listing", lambda d: int(by_id(d, "connections-table").get_attribute("data-listings")) > listed)
            return by_id(d, "connections-empty").is_displayed() and not row_ids(d, "connections-table", "data-conn")

        await await_page(browser, f"a new listing without {conn}", relisted_without_it)

        # An API error is shown as the API words it: a bad filter.
        by_id(browser, "conn-topic").send_keys("$nope")
        list_connections(browser)
        r = http_get_json(server, "/api/v1/connections?limit=50&topic=%24nope")
        assert r[0] == 400
        await await_page(browser, "the 400 message", lambda d: visible_text(d, "connections-error") == r[1]["message"])

        # Publish from the form: the subscribed client receives exactly that.
        sub, _ = await client(server, "reader", "shop")
        await subscribe(sub, "news")
        open_view(browser, "publish")
        Select(by_id(browser, "pub-project")).select_by_value("shop")
        by_id(browser, "pub-topic").send_keys("news")
        data = by_id(browser, "pub-data")
        data.clear()
        data.send_keys('{"from": "console", "n": [1, 2.5, null], "s": "é"}')
        by_id(browser, "pub-form").submit()
        answer = await await_page(browser, "the publish answer", lambda d: visible_text(d, "pub-answer"))
        mid = json.loads(answer)["id"]
        raw, msg = await recv_json(sub, timeout=WAIT)
        assert msg == {
            "type": "message",
            "topic": "news",
            "data": {"from": "console", "n": [1, 2.5, None], "s": "é"},
            "id": mid,
            "ts": msg["ts"],
        }, raw

        # A refused publish shows the API's message verbatim.
        topic = by_id(browser, "pub-topic")
        topic.clear()
        topic.send_keys("$reserved")
        by_id(browser, "pub-form").submit()
        status, err = http_post_json(
            server, "/api/v1/publish", {"project": "shop", "topic": "$reserved", "data": {"from": "console", "n": [1, 2.5, None], "s": "é"}}
        )
        assert status == 400
        await await_page(browser, "the publish error", lambda d: visible_text(d, "pub-error") == err["message"])

        # Live tail: the console subscribes with a minted token and shows what is published.
        by_id(browser, "tail-topic").send_keys("news")
        by_id(browser, "tail-form").submit()
        await await_page(browser, "the tail subscribed", lambda d: visible_text(d, "tail-status") == "Tailing news of shop.")
        status, _ = http_post_json(server, "/api/v1/publish", {"project": "shop", "topic": "news", "data": {"tailed": 7}})
        assert status == 200
        line = await await_page(
            browser, "the tailed message", lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#tail-log .line")]
        )
        assert len(line) == 1 and line[0].endswith(' {"tailed":7}'), line
        shot(browser, "publish")
        await close_all([sub])

        # Signing out forgets the key.
        by_id(browser, "sign-out").click()
        await await_page(browser, "the sign-in form again", lambda d: by_id(d, "signin").is_displayed())
        assert browser.execute_script("return sessionStorage.getItem('herald.console.key')") is None
        assert not by_id(browser, "nav").is_displayed()

    run(scenario(), timeout=120)


def test_project_key_sees_only_its_project(server, browser):
    async def scenario():
        mine, mine_welcome = await client(server, "shopper", "shop")
        other, other_welcome = await client(server, "blogger", "blog")
        sign_in(browser, server, PROJECTS["shop"]["api_key"])
        assert by_id(browser, "who-name").text == "project shop"

        await await_page(
            browser,
            "the project's connection chart",
            lambda d: d.find_elements(By.CSS_SELECTOR, "li[data-series='connections: shop']"),
        )
        series = [e.get_attribute("data-series") for e in browser.find_elements(By.CSS_SELECTOR, "li[data-series]")]
        assert series == ["connections: shop"], series

        open_view(browser, "projects")
        await await_page(browser, "its project only", lambda d: row_ids(d, "projects-table", "data-project") == ["shop"])

        open_view(browser, "connections")
        options = [o.get_attribute("value") for o in Select(by_id(browser, "conn-project")).options]
        assert options == ["shop"], options
        list_connections(browser)
        await await_page(
            browser, "its connection only", lambda d: row_ids(d, "connections-table", "data-conn") == [mine_welcome["conn"]]
        )
        assert other_welcome["conn"] not in browser.page_source

        open_view(browser, "publish")
        options = [o.get_attribute("value") for o in Select(by_id(browser, "pub-project")).options]
        assert options == ["shop"], options

        # A narrow window: nothing wider than the screen but the tables' own scroll boxes.
        browser.set_window_size(400, 800)
        open_view(browser, "connections")
        list_connections(browser)
        await await_page(browser, "the list again", lambda d: row_ids(d, "connections-table", "data-conn"))
        overflow = browser.execute_script("return document.documentElement.scrollWidth - window.innerWidth")
        assert overflow <= 0, f"the page is {overflow}px wider than a 400px window"
        shot(browser, "connections-narrow")
        await close_all([mine, other])

    run(scenario(), timeout=120)


def test_near_cap_warning_and_disconnect_user(servers, browser):
    """A project at 90% of its cap is flagged on the overview; disconnect-user closes every
    connection of that user (4003) and none of another's."""
    config = config_toml().replace('id = "shop"\n', 'id = "shop"\nmax_connections = 3\n', 1)
    server = servers.start(config=config)

    async def scenario():
        alice = [await client(server, "alice", "shop") for _ in range(2)]
        bob, _ = await client(server, "bob", "shop")
        sign_in(browser, server, PROJECTS["shop"]["api_key"])
        await await_page(
            browser,
            "the near-cap warning",
            lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#warnings .warning")]
            == ["Project shop is near its connection cap: 3 of 3."],
        )
        shot(browser, "overview-near-cap")
        open_view(browser, "connections")
        by_id(browser, "conn-user").send_keys("alice")
        list_connections(browser)
        ids = [welcome["conn"] for _, welcome in alice]
        await await_page(browser, "alice's connections", lambda d: sorted(row_ids(d, "connections-table", "data-conn")) == sorted(ids))
        browser.find_element(By.CSS_SELECTOR, f"tr[data-conn='{ids[0]}'] button[data-action='disconnect-user']").click()
        confirm(browser)
        for ws, _ in alice:
            await expect_close(ws, 4003, timeout=WAIT)
        await await_page(
            browser,
            "the disconnect notice",
            lambda d: visible_text(d, "connections-notice") == "Closed 2 connection(s) of user alice (4003).",
        )
        assert row_ids(browser, "connections-table", "data-conn") == []
        assert by_id(browser, "connections-empty").is_displayed()
        # bob is untouched.
        await subscribe(bob, "still-here")
        await close_all([bob])

    run(scenario(), timeout=120)


def test_connections_page_by_fifty(server, browser):
    async def scenario():
        conns = [await client(server, f"u{i}", "shop") for i in range(52)]
        ids = sorted((w["conn"] for _, w in conns), key=lambda c: [int(x, 16) for x in c.split("-")])
        sign_in(browser, server, ADMIN_KEY)
        open_view(browser, "connections")
        await await_page(browser, "the first page", lambda d: row_ids(d, "connections-table", "data-conn") == ids[:50])
        assert by_id(browser, "conn-first").get_attribute("disabled") is not None
        by_id(browser, "conn-next").click()
        await await_page(browser, "the second page", lambda d: row_ids(d, "connections-table", "data-conn") == ids[50:])
        assert by_id(browser, "conn-next").get_attribute("disabled") is not None
        by_id(browser, "conn-first").click()
        await await_page(browser, "the first page again", lambda d: row_ids(d, "connections-table", "data-conn") == ids[:50])
        await close_all([ws for ws, _ in conns])

    run(scenario(), timeout=120)


def test_hostile_strings_are_shown_as_text_and_sign_out_leaves_nothing(server, browser):
    """A user id and a published payload made of HTML reach the page as text only (no element
    is created, no script runs, the CSP reports nothing); the key does not stay in the form;
    signing out empties every view; a hash naming no view opens the overview."""
    evil = '<img src=x onerror="window.pwned=1">'

    async def scenario():
        ws, welcome = await client(server, evil, "shop")
        await subscribe(ws, "news")
        sign_in(browser, server, ADMIN_KEY)
        assert by_id(browser, "key").get_attribute("value") == ""
        open_view(browser, "connections")
        await await_page(
            browser, "the hostile user listed", lambda d: welcome["conn"] in row_ids(d, "connections-table", "data-conn")
        )
        row = browser.find_element(By.CSS_SELECTOR, f"tr[data-conn='{welcome['conn']}']")
        assert [c.text for c in row.find_elements(By.TAG_NAME, "td")][2] == evil

        open_view(browser, "publish")
        Select(by_id(browser, "pub-project")).select_by_value("shop")
        by_id(browser, "tail-topic").send_keys("news")
        by_id(browser, "tail-form").submit()
        await await_page(browser, "the tail subscribed", lambda d: visible_text(d, "tail-status") == "Tailing news of shop.")
        status, _ = http_post_json(server, "/api/v1/publish", {"project": "shop", "topic": "news", "data": {"h": evil}})
        assert status == 200
        lines = await await_page(
            browser, "the tailed message", lambda d: [e.text for e in d.find_elements(By.CSS_SELECTOR, "#tail-log .line")]
        )
        assert len(lines) == 1 and lines[0].endswith(" " + json.dumps({"h": evil}, separators=(",", ":"))), lines
        assert browser.execute_script("return document.querySelectorAll('main img').length") == 0
        assert browser.execute_script("return window.pwned") is None
        refused = [l for l in browser.get_log("browser") if "Content Security Policy" in l["message"]]
        assert refused == [], refused

        by_id(browser, "sign-out").click()
        await await_page(browser, "the sign-in form again", lambda d: by_id(d, "signin").is_displayed())
        left = browser.execute_script(
            "return ['tail-log', 'charts', 'connections-table', 'projects-table', 'pub-answer']"
            ".map((id) => document.getElementById(id).textContent.includes('pwned') ||"
            " document.getElementById(id).querySelectorAll('tbody tr, .line').length)"
        )
        assert left == [0, 0, 0, 0, 0], left
        await close_all([ws])

        # A hash that names no view (here an Object.prototype property) opens the overview.
        browser.get(f"{server.api_url}/console#__proto__")
        by_id(browser, "key").send_keys(ADMIN_KEY)
        by_id(browser, "signin-form").submit()
        wait(browser, "the overview", lambda d: by_id(d, "view-overview").is_displayed())
        assert visible_text(browser, "signin-error") == ""

    run(scenario(), timeout=120)


def test_a_bad_key_is_refused_with_the_api_message(server, browser):
    browser.get(f"{server.api_url}/console")
    wait(browser, "the sign-in form", lambda d: by_id(d, "key")).send_keys("not-a-key")
    by_id(browser, "signin-form").submit()
    wait(browser, "the refusal", lambda d: visible_text(d, "signin-error") == "unknown API key")
    assert not by_id(browser, "nav").is_displayed()
    assert browser.execute_script("return sessionStorage.getItem('herald.console.key')") is None
    shot(browser, "signin-refused")


# --------------------------------------------------------------------------------------------


def http_get_json(server, path: str, key: str = ADMIN_KEY) -> tuple[int, dict]:
    r = http_request("GET", f"{server.api_url}{path}", None, {"Authorization": f"Bearer {key}"})
    return r.status, r.json()


def http_post_json(server, path: str, body: dict, key: str = ADMIN_KEY) -> tuple[int, dict]:
    r = http_request(
        "POST",
        f"{server.api_url}{path}",
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    return r.status, r.json()

