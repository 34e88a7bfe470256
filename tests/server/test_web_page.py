"""The web page at / driven in headless Chromium (Debian's chromium + chromium-driver): pick an image and options,
submit, follow the progress bar, and see the finished video play; the screenshot is checked."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from serving import TOKEN, png_bytes

webdriver = pytest.importorskip("selenium.webdriver")
CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Debian's chromium and chromium-driver (apt-get install chromium "
                                       "chromium-driver)")  # fmt: skip


@pytest.fixture()
def browser(tmp_path):
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1280,1000", "--autoplay-policy=no-user-gesture-required",
                     f"--user-data-dir={tmp_path / 'profile'}"):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(DRIVER))
    yield driver
    driver.quit()


def test_page_submits_a_job_and_plays_the_video(server, browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    start = tmp_path / "start.png"
    start.write_bytes(png_bytes(96, 64))
    browser.get(server.url + "/")
    browser.find_element(By.ID, "token").send_keys(TOKEN)
    browser.find_element(By.ID, "image").send_keys(str(start))
    for field, value in {"frames": "8", "steps": "3", "size": "32x32", "seed": "3"}.items():
        element = browser.find_element(By.ID, field)
        element.clear()
        element.send_keys(value)
    browser.find_element(By.ID, "submit").click()

    def video_playing(driver) -> bool:
        return driver.execute_script(
            "const v = document.getElementById('video');"
            "return !v.hidden && v.readyState >= 2 && v.videoWidth === 32 && v.currentTime > 0;"
        )

    try:
        WebDriverWait(browser, 240, poll_frequency=0.5).until(video_playing)
    finally:
        browser.save_screenshot(str(Path(tmp_path) / "page.png"))
    status = browser.find_element(By.ID, "status").text
    assert status.startswith("done in"), status
    assert browser.execute_script("const p = document.getElementById('progress'); return p.value === p.max;")
    job_id = browser.find_element(By.ID, "job-id").text
    with server.client() as client:
        assert client.get(f"/v1/jobs/{job_id}").json()["state"] == "done"

    def listed_done(driver) -> bool:  # the queue list shows the job as done
        rows = driver.execute_script("return [...document.querySelectorAll('#queue tbody tr')].map(r => r.innerText);")
        return any(job_id[:8] in row and "done" in row for row in rows)

    WebDriverWait(browser, 10, poll_frequency=0.5).until(listed_done)

    browser.execute_script("document.getElementById('video').pause();")
    shot = Image.open(io.BytesIO(browser.get_screenshot_as_png())).convert("RGB")
    shot.save(tmp_path / "page.png")
    rect = browser.execute_script("return document.getElementById('video').getBoundingClientRect().toJSON();")
    scale = shot.width / browser.execute_script("return window.innerWidth;")
    box = [round(rect[k] * scale) for k in ("left", "top", "right", "bottom")]
    pixels = np.asarray(shot.crop((box[0], box[1], box[2], box[1] + (box[3] - box[1]) // 2)), dtype=np.float32)
    assert box[2] - box[0] >= 300, box  # the 32 px video is shown 384 px wide
    assert pixels.std() > 10, f"the video area is flat (std {pixels.std():.1f}): no frame was drawn"
    assert pixels.mean(axis=(0, 1)).max() > 30, "the video area is black"
