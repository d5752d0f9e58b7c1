"""`stdrc app` in a real browser: Debian's Chromium driven by Playwright against the page on the tiny bundle.

Needs the `chromium` apt package (`.ci/run` installs it) and the `app` + `test` extras. The test
fails, not skips, when Chromium is missing; set STDRC_SKIP_BROWSER_TESTS=1 to skip it on purpose.
STDRC_APP_SCREENSHOT=docs/img/app.png saves the page after the generation (the README's picture).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

if os.environ.get("STDRC_SKIP_BROWSER_TESTS") == "1":
    pytest.skip("STDRC_SKIP_BROWSER_TESTS=1", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright

pytestmark = pytest.mark.slow  # Chromium and a `stdrc app` process
CHROMIUM = os.environ.get("STDRC_CHROMIUM", "/usr/bin/chromium")
PROMPT = "an astronaut smiling at the camera"
STEPS = 2
SEED = 3
WAIT_MS = 90_000
LONG = 1000  # steps (the most allowed): 100 tiny steps took ~1.3 s here, so Cancel lands well before the end


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(tiny_bundle, tmp_path_factory):
    """`stdrc app` as a user starts it, on a free port; stopped (and checked stopped) afterwards."""
    tmp = tmp_path_factory.mktemp("app")
    port = free_port()
    env = {**os.environ, "GRADIO_TEMP_DIR": str(tmp / "gradio"), "GRADIO_ANALYTICS_ENABLED": "False"}
    log = (tmp / "app.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "stdrc.cli", "app", "--bundle", str(tiny_bundle),
                             "--port", str(port)], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"stdrc app exited with {proc.returncode}:\n{(tmp / 'app.log').read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"stdrc app did not answer on {url}:\n{(tmp / 'app.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    assert "Traceback" not in (tmp / "app.log").read_text(), (tmp / "app.log").read_text()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set STDRC_SKIP_BROWSER_TESTS=1)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium"))
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.goto(app_url)
    expect(page.locator("#generate")).to_be_visible(timeout=30_000)
    try:
        yield page
    finally:
        context.close()


def upload(page: Page, photo: Path) -> None:
    page.locator("#reference input[type=file]").set_input_files(str(photo))


def set_steps(page: Page, steps: int) -> None:
    page.locator("#steps input").fill(str(steps))


def test_generate_in_the_browser(page, tiny_bundle, astronaut_png, tmp_path):
    from stdrc.runtime.pipeline import Pipeline

    upload(page, astronaut_png)
    expect(page.locator("#crop img")).to_be_visible(timeout=WAIT_MS)  # the face crop, before any generation
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#seed input").fill(str(SEED))
    set_steps(page, STEPS)
    page.locator("#generate").click()

    video = page.locator("#video video")
    expect(video).to_have_count(1, timeout=WAIT_MS)
    duration = video.evaluate("""v => new Promise((resolve, reject) => {
        v.muted = true;
        const done = () => resolve(v.duration);
        if (v.readyState >= 1) done(); else v.addEventListener('loadedmetadata', done);
        v.addEventListener('error', () => reject(new Error('video error ' + (v.error && v.error.code))));
    })""")
    assert duration > 0
    played = video.evaluate("""async v => { await v.play();
        await new Promise(r => v.currentTime > 0 ? r() : v.addEventListener('timeupdate', r, {once: true}));
        return v.currentTime; }""")
    assert played > 0  # the browser decodes the codec, not just reads the header

    # the page shows what the library computes for the same inputs, worded as the CLI words it
    expected = Pipeline.from_bundle(tiny_bundle).generate(astronaut_png, prompt=PROMPT, seed=SEED, steps=STEPS).facesim
    text = "n/a (no face in the generated frames)" if expected is None else f"{expected:.3f}"
    expect(page.locator("#facesim textarea")).to_have_value(text)
    expect(page.locator("#sheet img")).to_be_visible()
    expect(page.locator("#status")).to_contain_text("done in")
    shot = os.environ.get("STDRC_APP_SCREENSHOT") or str(tmp_path / "app.png")
    page.screenshot(path=shot, full_page=True)
    assert Path(shot).stat().st_size > 0


@pytest.mark.parametrize("case", ["no_face", "zero_steps"])
def test_bad_input_shows_the_cli_error_line(case, page, tiny_bundle, astronaut_png, blank_png, capsys, tmp_path):
    from stdrc.cli import main

    photo, steps = (blank_png, STEPS) if case == "no_face" else (astronaut_png, 0)
    assert main(["generate", "--bundle", str(tiny_bundle), "--ref", str(photo), "--prompt", PROMPT,
                 "--steps", str(steps), "-o", str(tmp_path / "out.mp4"), "-q"]) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("error: ") and "\n" not in line

    upload(page, photo)
    status = page.locator("#status")
    if case == "no_face":
        expect(status).to_have_text(line, timeout=WAIT_MS)  # on upload, from the face crop
    else:
        expect(page.locator("#crop img")).to_be_visible(timeout=WAIT_MS)
    page.locator("#prompt textarea").fill(PROMPT)
    set_steps(page, steps)
    page.locator("#generate").click()
    expect(status).to_have_text(line, timeout=WAIT_MS)  # from Generate, in the page
    expect(page.locator("#video video")).to_have_count(0)
    assert "Traceback" not in page.content()


def test_cancel_stops_the_run_and_the_next_one_runs(page, astronaut_png):
    upload(page, astronaut_png)
    expect(page.locator("#crop img")).to_be_visible(timeout=WAIT_MS)
    page.locator("#prompt textarea").fill(PROMPT)
    set_steps(page, LONG)
    page.locator("#generate").click()
    status = page.locator("#status")
    expect(status).to_contain_text("sampling", timeout=WAIT_MS)  # the progress bar is up: steps are running
    page.locator("#cancel").click()
    expect(status).to_have_text(re.compile(rf"cancelled after \d+ of {LONG} steps"), timeout=WAIT_MS)
    expect(page.locator("#video video")).to_have_count(0)
    set_steps(page, STEPS)
    page.locator("#generate").click()
    expect(status).to_contain_text("done in", timeout=WAIT_MS)
    expect(page.locator("#video video")).to_have_count(1)
