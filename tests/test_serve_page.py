"""The web page at / in a real headless Chromium (Debian's chromium and chromedriver, driven by
selenium): type a prompt, click Generate, watch the progress bar move, get the image and its
parameters. CI installs the browser; elsewhere the test skips when it is absent, and fails in CI.
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

webdriver = pytest.importorskip("selenium.webdriver")
pytest.importorskip("uvicorn")

from selenium.webdriver.chrome.options import Options  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from sdonnx.serve.config import Limits, ServeConfig  # noqa: E402
from test_serve import Running, free_port  # noqa: E402

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
if not (CHROMIUM and CHROMEDRIVER):
    if os.environ.get("CI"):
        pytest.fail("CI must install Debian's chromium and chromium-driver (.ci/run)", pytrace=False)
    pytest.skip("Debian's chromium and chromium-driver are not installed", allow_module_level=True)


@pytest.fixture
def browser():
    options = Options()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1100,1000"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_generate_from_the_page(browser, tmp_path):
    running = Running(ServeConfig(port=free_port(), limits=Limits(max_steps=1000)))
    try:
        browser.get(running.url + "/")
        wait = WebDriverWait(browser, 60)
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#sampler_name option")) > 5)
        assert browser.find_element(By.ID, "model").text.startswith("embedded")
        prompt = browser.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("a yellow triangle on a black background")
        browser.find_element(By.ID, "steps").send_keys("400")
        browser.find_element(By.ID, "seed").clear()
        browser.find_element(By.ID, "seed").send_keys("42")
        browser.find_element(By.ID, "generate").click()
        seen = []
        deadline = time.monotonic() + 60
        while not browser.find_elements(By.CSS_SELECTOR, "img.result") and time.monotonic() < deadline:
            seen.append(float(browser.find_element(By.ID, "bar").get_attribute("value")))
            time.sleep(0.05)
        assert any(0 < v < 1 for v in seen), "the progress bar never moved during the run"
        image = browser.find_element(By.CSS_SELECTOR, "img.result")
        wait.until(lambda d: d.execute_script("return arguments[0].naturalWidth", image) == 64)
        assert "Seed: 42" in browser.find_element(By.ID, "parameters").text
        assert browser.find_element(By.ID, "status").text == "done, seed 42"
        link = browser.find_element(By.CSS_SELECTOR, "#results a")
        assert link.get_attribute("download") == "sdonnx-42.png"
        browser.save_screenshot(str(tmp_path / "serve-page.png"))
        if os.environ.get("SDONNX_SCREENSHOT"):
            shutil.copy(tmp_path / "serve-page.png", os.environ["SDONNX_SCREENSHOT"])

        browser.find_element(By.ID, "width").send_keys("8192")  # over --max-side: the page shows the server's 422
        browser.find_element(By.ID, "generate").click()
        wait.until(lambda d: "width" in d.find_element(By.ID, "status").text)
        assert "error" in browser.find_element(By.ID, "status").get_attribute("class")
    finally:
        running.stop()
