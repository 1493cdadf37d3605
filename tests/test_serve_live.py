"""`seqgen serve` over real sockets (uvicorn on 127.0.0.1): a client that disconnects mid-request, and the web
page driven in headless Chromium (slow tier; skips where no browser is installed)."""
import json
import os
import shutil
import socket
import threading
import time

import pytest

pytest.importorskip("fastapi")
uvicorn = pytest.importorskip("uvicorn")

from seqgen.serve.app import create_app  # noqa: E402
from seqgen.serve.config import ServeConfig  # noqa: E402
from seqgen.serve.models import ServedModel  # noqa: E402
from test_serve import png_bytes, tiny_lm, tiny_translator  # noqa: E402


class LiveServer:
    """uvicorn in a thread on a free loopback port; stops when the test ends."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(timeout=10)


def post_json(url, body):
    import urllib.request
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_a_client_that_disconnects_mid_request_does_not_stop_the_server():
    served = {"mt": ServedModel("mt", "mt.pt", tiny_translator()), "lm": ServedModel("lm", "lm.pt", tiny_lm())}
    app = create_app(served, ServeConfig(amp="off", max_wait_ms=300))
    with LiveServer(app) as live:
        body = json.dumps({"text": "ein mann"}).encode()
        for partial in (False, True):
            s = socket.create_connection(("127.0.0.1", live.port), timeout=5)
            head = (f"POST /v1/translate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\n\r\n").encode()
            s.sendall(head + (body[:5] if partial else body))   # half a body, or a whole request
            s.close()                                          # ... and gone before the answer
        time.sleep(0.5)
        out = post_json(live.url + "/v1/translate", {"text": "eine frau"})
        assert out["translations"][0]["text"] is not None
        health = post_json(live.url + "/v1/generate", {"prompt": "RO", "greedy": True, "max_len": 5})
        assert health["texts"][0].startswith("RO")


def _chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


@pytest.mark.slow
def test_web_page_in_headless_chromium(tmp_path):
    """Type German and see English; drop a photo and see its caption and a word's attention; generate."""
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    browser, driver_path = _chromium(), shutil.which("chromedriver")
    if not browser or not driver_path:
        pytest.skip("no headless Chromium / chromedriver installed (apt-get install chromium chromium-driver)")
    from seqgen import zoo
    from seqgen.serve.models import load_served
    if not all(m.installed for m in zoo.shipped_models()):
        pytest.skip("the shipped models are not installed")
    served = load_served(["multi30k-de-en", "flickr8k-captioner", "shakespeare-char"])
    from seqgen.tasks.demo import demo_photos
    photo = (demo_photos() or [None])[0]
    if photo is None:
        photo = str(tmp_path / "red.png")
        with open(photo, "wb") as f:
            f.write(png_bytes((224, 224)))
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,2400"):
        options.add_argument(arg)
    with LiveServer(create_app(served, ServeConfig())) as live:
        driver = webdriver.Chrome(service=webdriver.ChromeService(driver_path), options=options)
        try:
            wait = WebDriverWait(driver, 60)
            driver.get(live.url + "/")
            wait.until(lambda d: "multi30k-de-en" in d.find_element(By.ID, "models").text)
            box = driver.find_element(By.ID, "de")
            box.clear()
            box.send_keys("Ein Hund läuft durch den Schnee.")
            driver.find_element(By.ID, "translate").click()
            wait.until(lambda d: d.find_element(By.ID, "en").text not in ("", "…"))
            english = driver.find_element(By.ID, "en").text
            assert "dog" in english.lower(), english

            driver.find_element(By.ID, "file").send_keys(os.path.abspath(photo))
            wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#words span"))
            caption = driver.find_element(By.ID, "caption").text
            assert caption and not caption.startswith("Error"), caption
            words = driver.find_elements(By.CSS_SELECTOR, "#words span")
            words[1].click()
            assert "on" in words[1].get_attribute("class")
            width = driver.execute_script("return document.getElementById('canvas').width")
            assert width > 100

            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "generated").text.startswith("ROMEO:"))
            driver.save_screenshot(str(tmp_path / "page.png"))
        finally:
            driver.quit()
