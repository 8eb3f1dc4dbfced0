"""The web UI at ``GET /`` (server/static/): the static files, and end to end in a real
headless browser against ``ediffi serve`` on the shipped model.

The end-to-end test types "a red circle and a blue square", paints "red circle" in the
left third and "blue square" in the right third, generates, waits for the job and checks
with the shapes analyser that each object landed where it was painted.

Browser: Debian's ``chromium`` + ``chromium-driver`` driven by Selenium (tests skip, saying
why, when they are missing). ``EDIFFI_UPDATE_DOCS=1`` also copies the screenshot of the
finished page to ``docs/web-ui.png``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from PIL import Image

from server.app import STATIC_DIR, create_app
from tests.support.redis_server import stop_process
from tests.support.api import make_settings

REPO = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO / "models" / "default"
DOCS_SCREENSHOT = REPO / "docs" / "web-ui.png"
CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROME_FLAGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--window-size=1280,1000",
)
CANVAS_CSS_PX = 256  # the paint canvas's on-screen size (64x64 model pixels)
MODEL_PX = 64


# ------------------------------------------------------------------ static files


def test_page_default_strength_is_the_api_default() -> None:
    """A new region starts at the API's default w' (what `ediffi eval` measures),
    and the slider reaches it."""
    from ediffi.paint import DEFAULT_STRENGTH

    js = (STATIC_DIR / "app.js").read_text()
    start = float(re.search(r"phrase, strength: ([0-9.]+) }", js).group(1))
    slider_max = float(re.search(r'class="strength">strength <input type="range" min="0" max="([0-9.]+)"', js).group(1))
    assert start == DEFAULT_STRENGTH
    assert slider_max >= DEFAULT_STRENGTH


def _get(app, paths: list[str], headers: dict[str, str] | None = None) -> dict[str, httpx.Response]:
    async def run() -> dict[str, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as client:
            return {path: await client.get(path, headers=headers or {}) for path in paths}

    return asyncio.run(run())


def test_root_serves_page_and_assets() -> None:
    app = create_app(make_settings())
    responses = _get(app, ["/", "/app.js", "/style.css", "/healthz"])
    page = responses["/"]
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    # every local asset the page references is served, with its type
    assets = re.findall(r'(?:src|href)="([^":]+)"', page.text)
    assert sorted(assets) == ["app.js", "style.css"]
    assert responses["/app.js"].status_code == 200
    assert "javascript" in responses["/app.js"].headers["content-type"]
    assert responses["/style.css"].status_code == 200
    assert responses["/style.css"].headers["content-type"].startswith("text/css")
    # the mount at / does not shadow the API
    assert responses["/healthz"].json() == {"status": "ok"}


def test_page_is_open_when_api_keys_are_configured() -> None:
    app = create_app(make_settings(api_keys=["secret"]))
    responses = _get(app, ["/", "/app.js", "/jobs/" + "0" * 32])
    assert responses["/"].status_code == 200
    assert responses["/app.js"].status_code == 200
    assert responses["/jobs/" + "0" * 32].status_code == 401  # the API itself still wants the key


def test_script_and_page_agree_on_element_ids() -> None:
    """Every ``$("id")`` the script looks up exists in the page (no build step checks it)."""
    html = (STATIC_DIR / "index.html").read_text()
    script = (STATIC_DIR / "app.js").read_text()
    page_ids = set(re.findall(r'\bid="([^"]+)"', html))
    used = set(re.findall(r'\$\("([^"]+)"\)', script))
    assert used, "the script looks up no element?"
    assert used <= page_ids, f"missing in index.html: {sorted(used - page_ids)}"
    # field-error slots the script targets by loc exist for the main fields
    slots = set(re.findall(r'data-error-for="([^"]+)"', html))
    assert {"prompt", "steps", "guidance_scale", "seed", "sampler", "style_image", "paint_with_words.color_map"} <= slots


def test_mask_brush_shares_the_paint_brush_and_its_controls_are_labelled() -> None:
    """The mask brush paints with the paint-with-words canvas's brush (one copy of it), sits with the
    mask file (hidden with it for a model that takes no mask), and every control of it has a label
    or an accessible name; its buttons are real buttons (keyboard-usable)."""
    html = (STATIC_DIR / "index.html").read_text()
    script = (STATIC_DIR / "app.js").read_text()
    assert len(re.findall(r"\bfunction stamp\(", script)) == 1
    assert len(re.findall(r"\bfunction attachBrush\(", script)) == 1
    assert sorted(re.findall(r'attachBrush\(\$\("([^"]+)"\)', script)) == ["mask-canvas", "paint"]
    assert script.count("setPointerCapture") == 1  # one pointer-stroke handler
    # the painting is what the file upload fills: state.mask, sent as `mask`
    assert re.search(r"body\.mask = state\.mask\.b64", script)
    assert re.search(r'\$\("mask-controls"\)\.hidden = caps\.mask === false', script)

    mask_controls = html[html.index('<div id="mask-controls">'):html.index('<label for="strength">')]
    for element_id in ("mask-image", "mask-preview", "clear-mask", "mask-painter", "mask-canvas"):
        assert f'id="{element_id}"' in mask_controls, element_id
    for element_id in ("mask-brush-size", "mask-eraser"):
        labelled = f'<label for="{element_id}"' in html or re.search(
            rf'<label[^>]*>\s*<input id="{element_id}"', html
        )
        assert labelled, f"{element_id} has no label"
    assert re.search(r'<canvas id="mask-canvas"[^>]*aria-label="[^"]+"', html)
    for element_id in ("clear-mask-paint", "invert-mask", "clear-mask"):
        assert re.search(rf'<button type="button" id="{element_id}"[^>]*>[^<]+</button>', html), element_id
    # the painter is hidden until an init image is chosen, and [hidden] wins over its flex layout
    assert re.search(r'<div id="mask-painter"[^>]*\bhidden\b', html)
    assert re.search(r"\.mask-paint\[hidden\]\s*\{\s*display:\s*none", (STATIC_DIR / "style.css").read_text())


# ---------------------------------------------------------------------- browser


def browser_missing() -> str | None:
    """Why the browser tests cannot run here, or None."""
    for path, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not os.access(path, os.X_OK):
            return f"{path} not found: apt-get install chromium chromium-driver"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install selenium)"
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator["object"]:
    """A headless Chromium with a fresh profile, closed after the module."""
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service as ChromeService

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="ediffi-chromium-")
    for flag in CHROME_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    driver = webdriver.Chrome(options=options, service=ChromeService(executable_path=CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def open_page(driver, base_url: str, *, api_key: str | None = None) -> None:
    """Load the page with empty storage (or only ``api_key`` stored)."""
    driver.get(base_url + "/")
    driver.execute_script("localStorage.clear();")
    if api_key is not None:
        driver.execute_script("localStorage.setItem('ediffi.apiKey', arguments[0]);", api_key)
    driver.get(base_url + "/")
    wait_for(driver, lambda d: d.execute_script("return document.readyState") == "complete", 10)


def wait_for(driver, condition, timeout_s: float, message: str = ""):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout_s, poll_frequency=0.2).until(condition, message)


def set_value(driver, element_id: str, value: str) -> None:
    """Set an input's value and fire its input/change events (ranges and numbers)."""
    driver.execute_script(
        "const el = document.getElementById(arguments[0]); el.value = arguments[1];"
        "el.dispatchEvent(new Event('input', {bubbles: true}));"
        "el.dispatchEvent(new Event('change', {bubbles: true}));",
        element_id,
        value,
    )


def type_prompt(driver, text: str) -> None:
    prompt = driver.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(text)


def chip(driver, word: str):
    for element in driver.find_elements("css selector", "#chips .chip"):
        if element.text == word:
            return element
    raise AssertionError(f"no chip {word!r} among {[e.text for e in driver.find_elements('css selector', '#chips .chip')]}")


def select_phrase(driver, words: list[str], *, shift: bool = False) -> None:
    """Click the first word's chip, then the last one's (shift-click) or each next one (adjacent clicks)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    chip(driver, words[0]).click()
    if shift:
        ActionChains(driver).key_down(Keys.SHIFT).click(chip(driver, words[-1])).key_up(Keys.SHIFT).perform()
    else:
        for word in words[1:]:
            chip(driver, word).click()
    button = driver.find_element("id", "add-region")
    assert button.text == "Paint “" + " ".join(words) + "”", button.text
    button.click()


def paint_rect(driver, x0: float, y0: float, x1: float, y1: float, brush: int = 8) -> None:
    """Paint (zigzag mouse drags) over model pixels [x0, x1] x [y0, y1] (brush centres) with the active region."""
    from selenium.webdriver.common.action_chains import ActionChains

    set_value(driver, "brush-size", str(brush))
    canvas = driver.find_element("id", "paint")
    scale = CANVAS_CSS_PX / MODEL_PX
    half = CANVAS_CSS_PX / 2

    def offset(x: float, y: float) -> tuple[int, int]:  # model px -> offset from the canvas centre
        return round(x * scale - half), round(y * scale - half)

    rows = []
    y = y0
    while y <= y1:
        rows.append(y)
        y += brush / 2
    actions = ActionChains(driver, duration=10)
    actions.move_to_element_with_offset(canvas, *offset(x0, rows[0])).click_and_hold()
    for k, y in enumerate(rows):
        xs = (x0, x1) if k % 2 == 0 else (x1, x0)
        for x in xs:
            actions.move_to_element_with_offset(canvas, *offset(x, y))
    actions.release().perform()


def painted_labels(driver) -> dict[str, int]:
    """Pixels per phrase as the page holds them."""
    return driver.execute_script(
        "const out = {};"
        "document.querySelectorAll('#regions li').forEach(li => {"
        "  out[li.dataset.phrase] = parseInt(li.querySelector('.count').textContent) || 0; });"
        "return out;"
    )


def result_png(driver) -> bytes:
    src = driver.find_element("id", "result").get_attribute("src")
    assert src.startswith("data:image/png;base64,"), src[:40]
    return base64.b64decode(src.split(",", 1)[1])


def save_screenshot(driver, out_dir: Path, name: str = "web-ui.png") -> Path:
    path = out_dir / name
    driver.set_window_size(1280, 1000)
    assert driver.save_screenshot(str(path)), "screenshot failed"
    return path


# ------------------------------------------------------------------ end to end


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> Iterator[str]:
    """``python -m ediffi serve`` on the shipped model; yields its base URL once ready."""
    if not (MODEL_DIR / "model.json").is_file():
        pytest.skip(f"{MODEL_DIR} holds no model yet (model.json missing)")
    reason = browser_missing()
    if reason:
        pytest.skip(reason)
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDIFFI_")}
    env["EDIFFI_MODEL_DIR"] = str(MODEL_DIR)
    env["EDIFFI_ALLOW_ANONYMOUS"] = "true"  # loopback, no keys (as `make serve`)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ediffi", "serve", "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ediffi serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(base_url + "/readyz", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"ediffi serve not ready after 180 s:\n{log_path.read_text()[-4000:]}")
            time.sleep(0.5)
        yield base_url
    finally:
        stop_process(proc, timeout_s=20)


@pytest.fixture(scope="module")
def painted_result(browser, served_model, tmp_path_factory):
    """The whole flow in the browser against the real server and shipped
    model; returns the generated image (the two tests below judge it)."""
    tmp_path = tmp_path_factory.mktemp("web-ui")
    driver = browser
    open_page(driver, served_model)
    type_prompt(driver, "a red circle and a blue square")
    assert [c.text for c in driver.find_elements("css selector", "#chips .chip")] == [
        "a", "red", "circle", "and", "a", "blue", "square",
    ]
    # "red circle" by clicking adjacent chips; painted over the middle cell of the left third
    select_phrase(driver, ["red", "circle"])
    paint_rect(driver, 4, 26, 17, 38)
    # "blue square" by shift-click; painted over the middle cell of the right third
    select_phrase(driver, ["blue", "square"], shift=True)
    paint_rect(driver, 47, 26, 60, 38)
    counts = painted_labels(driver)
    assert counts["red circle"] > 250 and counts["blue square"] > 250, counts

    set_value(driver, "steps", "24")
    set_value(driver, "seed", "7")
    driver.find_element("id", "generate").click()
    state = wait_for(
        driver,
        lambda d: (s := d.find_element("id", "status").get_attribute("data-state")) in {"succeeded", "failed", "canceled"}
        and s,
        240,
        "the job did not finish in 240 s",
    )
    errors = driver.execute_script(
        "return [...document.querySelectorAll('.error')].map(e => e.textContent).filter(Boolean)"
    )
    assert state == "succeeded", (state, errors)

    shot = save_screenshot(driver, tmp_path)
    if os.environ.get("EDIFFI_UPDATE_DOCS") == "1":
        DOCS_SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, DOCS_SCREENSHOT)
    png = result_png(driver)
    (tmp_path / "result.png").write_bytes(png)
    # the page shows the job's image, as the API serves it
    job_id = driver.find_element("id", "result").get_attribute("data-job")
    with urllib.request.urlopen(f"{served_model}/jobs/{job_id}/images/0.png", timeout=10) as response:
        assert response.read() == png

    return Image.open(io.BytesIO(png)).convert("RGB"), shot


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_page_paints_and_generates_through_the_real_stack(painted_result) -> None:
    image, shot = painted_result
    assert image.size == (MODEL_PX, MODEL_PX)
    assert shot.is_file()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_paint_red_circle_left_blue_square_right(painted_result) -> None:
    from ediffi.world import analyse

    image, shot = painted_result
    analysis = analyse(image)
    found = [(o.color, o.shape, tuple(round(v, 1) for v in o.centroid)) for o in analysis.objects]
    report = json.dumps({"style": analysis.style, "objects": found, "screenshot": str(shot)})
    print("analysis:", report)
    third = MODEL_PX / 3
    red = [o for o in analysis.objects if (o.color, o.shape) == ("red", "circle")]
    blue = [o for o in analysis.objects if (o.color, o.shape) == ("blue", "square")]
    assert red and blue, f"expected a red circle and a blue square, found {found}"
    assert all(o.centroid[0] < third for o in red), f"red circle not in the left third: {found}"
    assert all(o.centroid[0] > 2 * third for o in blue), f"blue square not in the right third: {found}"
