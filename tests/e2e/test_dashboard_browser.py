"""The dashboard in a real browser: headless Chromium driven by Selenium against a
running small mesh (control plane, telemetry, sidecars, traffic).

What a user would notice: the graph draws the services; a fault (abort 500) applied
with a VirtualService turns the edge red and its service page shows the 500s with
flag `FI`; a trace searched by its id shows its spans in call order. The screenshots
in docs/screenshots/ (README "Dashboard") are taken here.

Skipped, with the reason printed, where Chromium, chromedriver or selenium are missing
(`make test` installs them as root on Debian)."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support_dashboard import REVIEWS_ABORT_YAML, SmallMesh, small_mesh

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "docs" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def _missing() -> str:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    return ""


MISSING = _missing()
if MISSING:
    print(f"\nskipping the dashboard browser tests: {MISSING}")
pytestmark = pytest.mark.skipif(bool(MISSING), reason=MISSING or "ok")


@contextlib.contextmanager
def chromium() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="mesh-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run",
        "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--window-size=1400,1000",
    ):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


async def until(driver: Any, check: Callable[[Any], Any], timeout: float = 30.0) -> Any:
    """`check(driver)` in a thread until it returns something true (Selenium blocks)."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    from selenium.webdriver.support.ui import WebDriverWait

    def wait() -> Any:
        return WebDriverWait(
            driver, timeout, poll_frequency=0.25,
            ignored_exceptions=(StaleElementReferenceException, WebDriverException),
        ).until(check)  # fmt: skip

    return await asyncio.to_thread(wait)


async def on(driver: Any, call: Callable[[], Any]) -> Any:
    return await asyncio.to_thread(call)


def css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


@pytest.fixture
async def running_mesh(nats_server, etcd_server, prefix):
    async with small_mesh(nats_server.url, etcd_server.url, prefix) as m:
        yield m


async def keep_sending(m: SmallMesh, stop: asyncio.Event) -> None:
    while not stop.is_set():
        await m.send(2)
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def traffic(m: SmallMesh):
    stop = asyncio.Event()
    task = asyncio.create_task(keep_sending(m, stop), name="test:traffic")
    try:
        yield
    finally:
        stop.set()
        await task


async def test_graph_shows_the_services(running_mesh: SmallMesh) -> None:
    m = running_mesh
    await m.traced_chain()
    with chromium() as driver:
        async with traffic(m):
            await on(driver, lambda: driver.get(m.url + "/#/graph"))
            nodes = await until(
                driver,
                lambda d: (
                    (ids := {n.get_attribute("data-id") for n in css(d, "g.node")})
                    >= {"productpage-v1.default", "reviews-v2.default", "svc-b-v1.default"}
                    and ids
                ),
            )
            assert {"svc-a-v1.default", "svc-c-v1.default"} <= nodes
            edge = await until(
                driver,
                lambda d: css(
                    d, 'g.edge[data-from="productpage-v1.default"][data-to="reviews-v2.default"]'
                ),
            )
            # healthy, and mutual TLS as the server side saw it
            assert edge[0].get_attribute("class") == "edge ok"
            assert "mTLS" in edge[0].find_element("css selector", ".edge-mtls").text
            SHOTS.mkdir(parents=True, exist_ok=True)
            await on(driver, lambda: driver.save_screenshot(str(SHOTS / "graph.png")))


async def test_a_fault_turns_the_edge_red_and_its_page_shows_500_fi(
    running_mesh: SmallMesh,
) -> None:
    m = running_mesh
    with chromium() as driver:
        async with traffic(m):
            await on(driver, lambda: driver.get(m.url + "/#/graph"))
            await until(driver, lambda d: css(d, 'g.edge.ok[data-to="reviews-v2.default"]'))
            await m.mesh.apply(REVIEWS_ABORT_YAML)
            # aborted requests never reach a workload: the edge goes to the service
            failing = 'g.edge[data-from="productpage-v1.default"][data-to="reviews.default"]'
            edge = await until(
                driver,
                lambda d: [e for e in css(d, failing) if e.get_attribute("class") == "edge bad"],
            )
            assert edge[0].find_element("css selector", ".edge-success").text == "0.0 %"
            await on(driver, lambda: driver.save_screenshot(str(SHOTS / "graph-fault.png")))
            await on(driver, lambda: edge[0].find_element("css selector", ".edge-success").click())
            await until(driver, lambda d: d.current_url.endswith("#/service/default/reviews"))
            row = await until(
                driver,
                lambda d: css(
                    d, '[data-testid="inbound-codes"] tr[data-code="500"][data-flag="FI"]'
                ),
            )
            assert int(row[0].find_elements("css selector", "td")[2].text) > 0
            success = css(driver, '[data-testid="inbound-success"]')[0]
            assert success.get_attribute("class") in ("bad", "warn")
            await on(driver, lambda: driver.execute_script("window.scrollTo(0, 0)"))
            await on(driver, lambda: driver.save_screenshot(str(SHOTS / "service.png")))


async def test_a_trace_searched_by_id_shows_its_spans_in_order(running_mesh: SmallMesh) -> None:
    m = running_mesh
    trace_id = await m.traced_chain()
    with chromium() as driver:
        await on(driver, lambda: driver.get(m.url + "/#/traces"))
        field = await until(driver, lambda d: css(d, '#trace-search input[name="trace_id"]'))

        def search() -> None:
            field[0].send_keys(trace_id)
            css(driver, '#trace-search button[type="submit"]')[0].click()

        await on(driver, search)

        def found(d: Any) -> Any:
            rows = css(d, f'#trace-results tr[data-trace="{trace_id}"]')
            if rows and rows[0].find_elements("css selector", "td")[3].text == "4":
                return rows
            d.refresh()  # spans still arriving: search again
            return None

        rows = await until(driver, found)
        await on(driver, lambda: rows[0].find_element("css selector", "a").click())
        spans = await until(
            driver,
            lambda d: len(css(d, "#waterfall .span-row")) == 4 and css(d, "#waterfall .span-row"),
        )
        order = [(s.get_attribute("data-service"), s.get_attribute("data-kind")) for s in spans]
        assert order == [
            ("svc-a", "client"), ("svc-b", "server"), ("svc-b", "client"), ("svc-c", "server"),
        ]  # fmt: skip
        # a span's attributes open under it
        await on(driver, lambda: spans[0].click())
        attrs = spans[0].find_element("css selector", ".attrs")
        await until(driver, lambda d: attrs.is_displayed())
        assert "http.method" in attrs.text and "GET" in attrs.text
        await on(driver, lambda: driver.save_screenshot(str(SHOTS / "trace.png")))


async def test_access_log_tails_live_with_a_flag_filter_and_config_lists_resources(
    running_mesh: SmallMesh,
) -> None:
    m = running_mesh
    await m.mesh.apply(REVIEWS_ABORT_YAML)
    with chromium() as driver:
        await on(driver, lambda: driver.get(m.url + "/#/access?flag=FI"))
        await until(driver, lambda d: css(d, "#access-log"))
        async with traffic(m):  # records arrive while the page is open
            rows = await until(driver, lambda d: len(css(d, "#access-log tbody tr")) >= 3
                               and css(d, "#access-log tbody tr"))  # fmt: skip
        assert {(r.get_attribute("data-status"), r.get_attribute("data-flags")) for r in rows} == {
            ("500", "FI")
        }
        # fields a record leaves at their default show empty, not as "undefined"
        assert "undefined" not in await on(driver, lambda: css(driver, "#access-log")[0].text)
        await on(driver, lambda: driver.save_screenshot(str(SHOTS / "access.png")))

        await on(driver, lambda: driver.get(m.url + "/#/config"))
        vs = await until(
            driver, lambda d: css(d, 'tr[data-kind="VirtualService"][data-name="reviews"]')
        )
        assert vs
        page = await on(driver, lambda: css(driver, "#config")[0].text)
        assert "Proxy status" in page and "SYNCED" in page and "undefined" not in page
        await on(driver, lambda: driver.save_screenshot(str(SHOTS / "config.png")))
