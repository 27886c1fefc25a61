"""The dashboard in a real browser: Debian's headless Chromium, driven by Selenium.

Logs in through Airflow's own login form (the cookie the UI gets is what the plugin
reads), opens the rounds page, checks the table and the plot, saves a screenshot, then
opens the plugin's nav entry inside the Airflow UI (an iframe at ``/plugin/dadm-fl``),
and the "FL round" tab of a real DAG run at typical frame widths (no nav bar of its own,
nothing wider than the frame).
No browser or driver is downloaded: ``make browser`` installs chromium and
chromium-driver; without them this test fails (it does not skip).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.plugin_fixtures import DASHBOARD, RUN_QUARANTINE

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WAIT = 30


@pytest.fixture
def browser(tmp_path, monkeypatch):
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not p.exists()]
    if missing:
        pytest.fail(
            f"{', '.join(missing)} missing: run `make browser` (as root: "
            "apt-get install -y chromium chromium-driver)",
            pytrace=False,
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must not fetch anything
    options = Options()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1400,1000",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):
        options.add_argument(flag)
    service = Service(str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def test_rounds_page_after_logging_in_through_airflow(dashboard_server, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    server = dashboard_server
    wait = WebDriverWait(browser, WAIT)
    rounds_url = f"{server.url}{DASHBOARD}/rounds"

    # anonymous: the plugin's 401 page, which links to Airflow's login
    browser.get(rounds_url)
    assert not browser.find_elements(By.CSS_SELECTOR, "table#rounds")
    browser.find_element(By.LINK_TEXT, "Log in to Airflow").click()

    # Airflow's own login form (SimpleAuthManager); it sends us back to the page
    wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(server.passwords["admin"])
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(ec.url_to_be(rounds_url))
    assert browser.get_cookie("_token"), "the login form set no _token cookie"

    table = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table#rounds")))
    rows = table.find_elements(By.CSS_SELECTOR, "tr.round")
    assert [r.get_attribute("data-run-id") for r in rows] == list(dashboard_server.history.reports)[
        ::-1
    ]
    quarantine_row = next(r for r in rows if r.get_attribute("data-run-id") == RUN_QUARANTINE)
    assert "norm_exceeded: 1" in quarantine_row.text and "published" in quarantine_row.text
    plot = browser.find_element(By.CSS_SELECTOR, "div.plot svg")
    assert plot.is_displayed() and plot.size["width"] > 300 and plot.size["height"] > 200
    assert len(plot.find_elements(By.CSS_SELECTOR, "g.point")) >= 8
    assert plot.find_elements(By.CSS_SELECTOR, "g.rollback")
    assert plot.find_elements(By.CSS_SELECTOR, "g.rejected")

    screenshot = tmp_path / "ui-rounds.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000
    print(f"\nscreenshot of the rounds page: {screenshot}")

    # the per-round quarantine page, reached by its link
    quarantine_row.find_element(By.CSS_SELECTOR, "a[href$='/quarantine']").click()
    wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table#quarantine")))
    assert quote(RUN_QUARANTINE, safe="") in browser.current_url
    assert len(browser.find_elements(By.CSS_SELECTOR, "table#quarantine tr.quarantined")) == 2

    # the nav entry inside the Airflow UI: our page in the UI's iframe, same cookie
    browser.get(f"{server.url}/plugin/dadm-fl")
    frame = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "iframe")))
    browser.switch_to.frame(frame)
    framed = wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "table#rounds")))
    assert len(framed.find_elements(By.CSS_SELECTOR, "tr.round")) == len(rows)
    browser.switch_to.default_content()
    ui_shot = tmp_path / "ui-airflow-nav.png"
    browser.save_screenshot(str(ui_shot))
    print(f"screenshot of the Airflow UI with the plugin: {ui_shot}")
    assert os.path.getsize(ui_shot) > 10_000


def fit_window_to_frame(browser, frame_width: int) -> dict[str, int]:
    """Resize the window until the Airflow UI lays the plugin's iframe out ``frame_width``
    pixels wide (the UI's side panels take the rest); returns the iframe's size."""
    from selenium.webdriver.common.by import By

    size = {}
    for _ in range(4):
        size = browser.find_element(By.CSS_SELECTOR, "iframe").size
        if abs(size["width"] - frame_width) <= 8:
            break
        window = browser.get_window_size()
        browser.set_window_size(window["width"] + frame_width - size["width"], window["height"])
    return size


def test_fl_round_tab_fits_its_frame_inside_the_airflow_ui(dashboard_server, browser, tmp_path):
    """The "FL round" tab of a real DAG run in Airflow's UI: our page in the UI's iframe,
    at a typical frame width, has no navigation bar of its own and nothing wider than the
    frame (no nested horizontal scrolling), long run ids and object keys wrapped."""
    import subprocess
    import sys
    from urllib.parse import urlparse

    import requests
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from tests.plugin_fixtures import airflow_env

    server = dashboard_server
    # a DAG run in Airflow's metadata DB under the run id of the round with a quarantine
    env = airflow_env(server.home, server.deployment, urlparse(server.url).port)
    airflow = Path(sys.executable).parent / "airflow"
    subprocess.run(
        [str(airflow), "dags", "reserialize"], env=env, check=True, capture_output=True, timeout=300
    )
    made = requests.post(
        f"{server.url}/api/v2/dags/fl_round/dagRuns",
        json={"dag_run_id": RUN_QUARANTINE, "logical_date": None},
        headers={"Authorization": f"Bearer {server.token()}"},
        timeout=30,
    )
    assert made.status_code in (200, 409), made.text  # 409: an earlier attempt made it

    wait = WebDriverWait(browser, WAIT)
    browser.get(f"{server.url}/auth/login")
    wait.until(ec.presence_of_element_located((By.NAME, "username"))).send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(server.passwords["admin"])
    browser.find_element(By.CSS_SELECTOR, "button[type=submit]").click()
    wait.until(lambda b: b.get_cookie("_token"))

    tab = f"{server.url}/dags/fl_round/runs/{quote(RUN_QUARANTINE, safe='')}/plugin/dadm-fl-round"
    for frame_width in (900, 640):
        browser.set_window_size(1400, 1000)
        browser.get(tab)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, "iframe")))
        size = fit_window_to_frame(browser, frame_width)
        assert abs(size["width"] - frame_width) <= 8, size
        shot = tmp_path / f"ui-fl-round-tab-{frame_width}.png"
        browser.switch_to.frame(browser.find_element(By.CSS_SELECTOR, "iframe"))
        rows = wait.until(
            ec.presence_of_all_elements_located(
                (By.CSS_SELECTOR, "table#quarantine tr.quarantined")
            )
        )
        assert len(rows) == 2 and "Quarantine (2)" in browser.page_source
        assert not browser.find_elements(By.CSS_SELECTOR, "header, nav")  # no second nav bar
        scroll, client = browser.execute_script(
            "const e = document.documentElement; return [e.scrollWidth, e.clientWidth];"
        )
        assert scroll <= client, (frame_width, scroll, client)
        overflowing = browser.execute_script(
            "const w = document.documentElement.clientWidth;"
            "return [...document.querySelectorAll('table, code, dd, h1')]"
            "  .filter(e => e.getBoundingClientRect().right > w + 0.5)"
            "  .map(e => e.outerHTML.slice(0, 80));"
        )
        assert overflowing == [], overflowing
        kept = browser.find_elements(By.CSS_SELECTOR, "code.kept")
        assert len(kept) == 2 and all(k.text.endswith(".bin") for k in kept)
        browser.switch_to.default_content()
        assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
        print(f"\nscreenshot of the FL round tab at a {frame_width} px frame: {shot}")
