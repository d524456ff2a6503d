"""The web chat page (GET /) in a real headless browser: Debian's chromium driven by selenium against the local
stack (tiny model). Paste a key, send two messages and watch them stream, reload (same session id and transcript),
send a third that continues the session, then stop a fourth mid-reply."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.integration, pytest.mark.timeout(300)]

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
# Set to a path to keep a screenshot of the page after the test's chat (docs/img/web_chat.png is made this way).
SCREENSHOT_ENV = "SINKSERVE_WEB_CHAT_SCREENSHOT"


@pytest.fixture
def browser(tmp_path):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not shutil.which(p)]
    if missing:
        pytest.fail(f"{' and '.join(missing)} missing: `make browser` installs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--window-size=1000,900", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _send(driver, wait, text: str) -> str:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    before = len(driver.find_elements(By.CSS_SELECTOR, ".message.assistant"))
    box = driver.find_element(By.ID, "message")
    box.send_keys(text)
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".message.assistant[data-done='1']")) == before + 1)
    reply = driver.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
    assert not driver.find_element(By.ID, "error").is_displayed(), driver.find_element(By.ID, "error").text
    assert "cut" not in reply.get_attribute("class")
    assert int(reply.get_attribute("data-deltas")) > 1, "the reply did not stream"
    assert reply.text.strip()
    return reply.text


def _transcript(driver) -> list[tuple[str, str]]:
    from selenium.webdriver.common.by import By

    return [("user" if "user" in m.get_attribute("class") else "assistant", m.text)
            for m in driver.find_elements(By.CSS_SELECTOR, "#transcript .message")]


def test_web_chat_streams_survives_reload_and_continues(stack, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    key = stack.tenant("web-chat")
    wait = WebDriverWait(browser, 60)
    browser.get(stack.http_url + "/")
    assert browser.title == "sinkserve chat"
    wait.until(lambda d: d.find_element(By.ID, "api-key").is_displayed())
    browser.find_element(By.ID, "api-key").send_keys(key)
    browser.find_element(By.ID, "save-key").click()
    wait.until(lambda d: not d.find_element(By.ID, "key-form").is_displayed())
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("12")

    _send(browser, wait, "Hello! What is an attention sink?")
    _send(browser, wait, "And why keep a window of recent tokens?")
    wait.until(lambda d: d.find_element(By.ID, "turns").text == "2")
    sid = browser.find_element(By.ID, "session-id").text
    record = stack.loop.run(stack.store.sessions.get_session(sid))
    assert record.tenant == "web-chat" and record.turns == 2
    fill = re.fullmatch(r"(\d+) / (\d+)", browser.find_element(By.ID, "cache-fill").text)
    assert fill and 0 < int(fill[1]) <= int(fill[2]) == stack.settings.engine.sinks + stack.settings.engine.window
    shown = _transcript(browser)
    assert [role for role, _ in shown] == ["user", "assistant"] * 2

    browser.refresh()  # the key, the conversation and its transcript come back from localStorage
    wait.until(lambda d: d.find_element(By.ID, "turns").text == "2")
    assert browser.find_element(By.ID, "session-id").text == sid
    assert not browser.find_element(By.ID, "key-form").is_displayed()
    assert _transcript(browser) == shown

    browser.find_element(By.ID, "max-tokens").clear()
    browser.find_element(By.ID, "max-tokens").send_keys("12")
    _send(browser, wait, "Thanks. One more question, then.")
    wait.until(lambda d: d.find_element(By.ID, "turns").text == "3")
    assert browser.find_element(By.ID, "session-id").text == sid
    assert stack.loop.run(stack.store.sessions.get_session(sid)).turns == 3
    assert len(_transcript(browser)) == 6

    shot = Path(os.environ.get(SCREENSHOT_ENV) or tmp_path / "web_chat.png")
    assert browser.save_screenshot(str(shot))

    # Stop: the page hangs up mid-reply, the reply is marked cut, and the server stops and records the turn cut.
    tokens = browser.find_element(By.ID, "max-tokens")
    tokens.clear()
    tokens.send_keys("90000")
    box = browser.find_element(By.ID, "message")
    box.send_keys("Now an endless story, please.")
    box.send_keys(Keys.ENTER)
    wait.until(lambda d: int(d.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1]
                             .get_attribute("data-deltas") or 0) > 2)
    browser.find_element(By.ID, "stop").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].get_attribute("data-done"))
    assert "cut" in browser.find_elements(By.CSS_SELECTOR, ".message.assistant")[-1].get_attribute("class")
    assert not browser.find_element(By.ID, "error").is_displayed()
    wait.until(lambda d: stack.loop.run(stack.store.sessions.get_session(sid)).turns == 4)
    last = stack.loop.run(stack.store.sessions.last_turn(sid))
    assert last.finish_reason == "aborted" and last.completion_tokens < 90_000
