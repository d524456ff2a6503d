"""Make docs/img/web_chat.png: the web chat page with the bundled SmolLM2 model answering (not the tiny random
model the browser test uses, whose replies are noise). A script, not a test:

    python -m tests.integration.web_chat_screenshot [OUT.png]

It starts what the integration stack starts (redis-server, a local Ray on 127.0.0.1 with one replica, the gateway
with its HTTP API on a free port), chats twice through the page in headless chromium, saves the screenshot and
stops everything it started.
"""

from __future__ import annotations

import sys
from pathlib import Path

from sinkserve.config import BUNDLED_MODEL, Settings
from sinkserve.store.redis_server import RedisServer

from .conftest import LoopThread
from .test_web_chat import CHROMEDRIVER, CHROMIUM, _send

ROOT = Path(__file__).resolve().parents[2]
QUESTIONS = ("What is the capital of France?", "Name three things to see there.")


def main(out: Path) -> None:
    import tempfile

    import ray
    from ray import serve
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from sinkserve.gateway.backend import ServeBackend
    from sinkserve.gateway.server import Gateway
    from sinkserve.http.server import HttpFrontEnd
    from sinkserve.replica.local import deploy, start_local_ray

    with RedisServer() as redis_server, tempfile.TemporaryDirectory() as profile:
        settings = Settings(
            engine={"model": BUNDLED_MODEL, "sinks": 4, "window": 252, "slots": 2, "device": "cpu",
                    "dtype": "float32", "num_threads": 2},
            replica={"num_replicas": 1, "num_cpus": 1},
            redis={"url": redis_server.url, "key_prefix": "shot"},
            gateway={"host": "127.0.0.1", "port": 0, "http_port": 0},
        )
        start_local_ray(settings, num_cpus=2)
        loop = LoopThread()
        try:
            deploy(settings)
            http = HttpFrontEnd(settings, port=0)
            gateway = Gateway(settings, ServeBackend.connect(settings.ray.app_name), frontends=[http])
            loop.run(gateway.start(), timeout=600)
            _, key = loop.run(gateway.store.tenants.create("demo"))
            options = webdriver.ChromeOptions()
            options.binary_location = CHROMIUM
            for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", "--window-size=1000,760", f"--user-data-dir={profile}"):
                options.add_argument(flag)
            driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
            try:
                wait = WebDriverWait(driver, 300)
                driver.get(http.url + "/")
                driver.find_element(By.ID, "api-key").send_keys(key)
                driver.find_element(By.ID, "save-key").click()
                tokens = driver.find_element(By.ID, "max-tokens")
                tokens.clear()
                tokens.send_keys("60")
                for question in QUESTIONS:
                    _send(driver, wait, question)
                wait.until(lambda d: d.find_element(By.ID, "turns").text == str(len(QUESTIONS)))
                out.parent.mkdir(parents=True, exist_ok=True)
                driver.save_screenshot(str(out))
            finally:
                driver.quit()
            loop.run(gateway.stop(grace_s=1))
        finally:
            loop.stop()
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    print(f"wrote {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "img" / "web_chat.png")
