"""The dashboard in a real headless browser (Debian's chromium, driven by selenium through chromedriver).

The set-up installs chromium and chromium-driver with apt when they are missing and this process may
(root, apt-get present); otherwise, or when the install fails, the test is skipped and says why.
A real supervised run (interrupted once, resumed) is the data; the browser opens the runs list,
follows the link to the run, waits for the timeline image to load and for the report's figures,
and saves a screenshot.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from spotsafe.dashboard.catalog import Catalog, run_id
from spotsafe.dashboard.server import serve

from .conftest import TINY_JOB, apt_install

SPOTSAFE = Path(sys.executable).with_name("spotsafe")
PACKAGES = ("chromium", "chromium-driver")


@pytest.fixture(scope="module")
def browser_paths() -> tuple[str, str]:
    browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if browser is None or driver is None:
        why = apt_install(*PACKAGES)
        browser, driver = shutil.which("chromium"), shutil.which("chromedriver")
        if browser is None or driver is None:
            pytest.skip(f"no headless browser: {why or 'chromium or chromedriver still missing after apt-get'}")
    return browser, driver


@pytest.fixture
def driver(browser_paths: tuple[str, str]) -> Iterator[object]:
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = browser_paths[0]
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1400,1700",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=browser_paths[1]))
    browser.set_page_load_timeout(60)
    try:
        yield browser
    finally:
        browser.quit()


@pytest.fixture(scope="module")
def supervised_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A real run under ``spotsafe run``: interrupted by SIGTERM at step 17, resumed, finished at 40."""
    root = tmp_path_factory.mktemp("dash")
    run, store = root / "runs" / "tiny", root / "jobs.sqlite"
    cmd = [str(SPOTSAFE), "run", "--url", str(run), "--store", str(store), "--backoff", "0", "--",
           sys.executable, str(TINY_JOB), "40", "--stop", "1:17", "--sleep", "0.02"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-2000:]
    return root, store


def test_the_dashboard_shows_a_run_in_a_real_browser(
    driver: object, supervised_run: tuple[Path, Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    root, store = supervised_run
    run = root / "runs" / "tiny"
    server = serve(Catalog([str(root / "runs")], [store]), 0, "127.0.0.1")
    base = f"http://127.0.0.1:{server.server_port}"
    browser = driver
    wait = WebDriverWait(browser, 60)  # type: ignore[arg-type]
    try:
        browser.get(base + "/")  # type: ignore[attr-defined]
        rows = browser.find_elements(By.CSS_SELECTOR, "table#runs tr.run")  # type: ignore[attr-defined]
        assert len(rows) == 1
        cells = [c.text for c in rows[0].find_elements(By.TAG_NAME, "td")]
        assert cells[0] == str(run) and cells[1] == "tiny" and cells[2] == "finished"
        assert cells[3] == "2" and cells[4] == "1" and cells[5] == "1/1" and cells[6] == "40"

        rows[0].find_element(By.TAG_NAME, "a").click()
        wait.until(lambda b: b.current_url.endswith(f"/run/{run_id(str(run))}"))
        image = browser.find_element(By.ID, "timeline")  # type: ignore[attr-defined]
        wait.until(lambda b: b.execute_script("return arguments[0].complete && arguments[0].naturalWidth", image))
        assert browser.execute_script("return arguments[0].naturalWidth", image) > 600  # type: ignore[attr-defined]
        figures = {
            row.find_element(By.TAG_NAME, "th").text: row.find_element(By.TAG_NAME, "td").text
            for row in browser.find_elements(By.CSS_SELECTOR, "table#figures tr")  # type: ignore[attr-defined]
        }
        assert figures["interruptions"].startswith("1 (1 SIGTERM")
        assert figures["resumed from a checkpoint"] == "1 of 1 restarts (100%)"
        assert "state" in figures and "final step 40" in figures["state"]
        attempts = browser.find_elements(By.CSS_SELECTOR, "table#attempts tbody tr")  # type: ignore[attr-defined]
        assert [r.find_elements(By.TAG_NAME, "td")[3].text for r in attempts] == ["preempted", "succeeded"]
        kinds = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "table#moments span.kind")]  # type: ignore[attr-defined]
        assert {"attempt", "notice", "interruption", "restore", "checkpoint"} <= set(kinds)
        assert kinds.index("notice") < kinds.index("interruption") < kinds.index("restore")

        shot = tmp_path / "dashboard.png"
        assert browser.save_screenshot(str(shot))  # type: ignore[attr-defined]
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
        keep = os.environ.get("DASHBOARD_SCREENSHOT_DIR")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            shutil.copy(shot, Path(keep) / "dashboard.png")
    finally:
        server.shutdown()
        server.server_close()


def test_the_cli_serves_until_sigterm(supervised_run: tuple[Path, Path], tmp_path: Path) -> None:
    """``spotsafe dashboard`` prints where it listens, answers, and exits 0 on SIGTERM."""
    import urllib3

    root, store = supervised_run
    proc = subprocess.Popen(
        [str(SPOTSAFE), "dashboard", str(root / "runs"), "--store", str(store), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line and "(1 run;" in line, line
        url = line.split()[2]
        response = urllib3.request("GET", url + "healthz", timeout=10.0, retries=False)
        assert response.status == 200 and response.data == b"ok\n"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
