"""The demo's report in a real browser: headless Chromium, no console errors, every section, every image.

Needs Debian's ``chromium`` and ``chromium-driver`` (``.ci/run`` installs them) and selenium (test
extra). Without them the test is skipped on a developer's machine and fails under CI.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import unitscope
from unitscope.report import TABLE_SECTIONS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
MISSING = not (CHROMIUM and DRIVER)
if MISSING and os.environ.get("CI") != "true":
    pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    assert not MISSING, "chromium and chromedriver are missing: apt-get install chromium chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,2000"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    yield driver
    driver.quit()


def expected_sections(run_dir: Path) -> list[str]:
    """Every section the report must show: one per analysis saved in the run, one per table section."""
    run = unitscope.load_run(run_dir)
    sections = [a.name for a in run.analyses]
    return ["manifest", *sections, *(t for t in TABLE_SECTIONS if t in run.tables and t not in sections)]


@pytest.mark.parametrize("model", ["digits-cnn", "shapes-cnn"])
def test_demo_report_renders_in_chromium(browser, quick_demo, model):
    from selenium.webdriver.common.by import By

    page = quick_demo / model / "report.html"
    browser.get(page.resolve().as_uri())
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    shown = [s.get_attribute("id") for s in browser.find_elements(By.CSS_SELECTOR, "section")]
    expected = expected_sections(quick_demo / model)
    assert shown == expected
    # the demo exercises the families: these sections must be there whatever else is
    assert {"moments", "saturation", "probes", "receptive_field"} <= set(shown)
    images = browser.execute_script(
        "return Array.from(document.images).map(i => [i.complete && i.naturalWidth > 0, i.alt])")
    assert len(images) >= len(expected) - 1
    assert [alt for ok, alt in images if not ok] == []
    for section in expected[1:]:
        # every section has a figure or a table
        found = browser.find_elements(By.CSS_SELECTOR, f"section[id='{section}'] img, "
                                                       f"section[id='{section}'] table")
        assert found, f"section {section} is empty"
    shot = quick_demo / f"report-{model}.png"
    browser.set_window_size(1280, min(12000, browser.execute_script("return document.body.scrollHeight")))
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 10_000
    keep = os.environ.get("UNITSCOPE_SCREENSHOTS")
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(keep) / shot.name)
