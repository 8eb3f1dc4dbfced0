"""The web UI in a real headless browser against the real API on the in-process queue, with
the worker stand-in of the API tests (no model): the colour map the page sends, the phrase
chips, progress, history, cancel, field-level errors and API keys.

Runs the app with uvicorn in a background thread; the stand-in worker runs on the same
event loop and records what each job carried.
"""

from __future__ import annotations

import asyncio
import io
import socket
import threading
from typing import Any, Iterator

import numpy as np
import pytest
import uvicorn
from PIL import Image

from server.app import create_app
from server.queue import ClaimedJob, InProcessQueue
from tests.support.api import QUEUE_LIMITS, QueueWorker, make_settings
from tests.e2e.test_web_ui import (
    MODEL_PX,
    browser,  # noqa: F401 - fixture
    open_page,
    paint_rect,
    painted_labels,
    result_png,
    select_phrase,
    set_value,
    type_prompt,
    wait_for,
)

pytestmark = pytest.mark.slow
TERMINAL = {"succeeded", "failed", "canceled"}


class RecordingWorker(QueueWorker):
    """The stand-in worker, keeping each job's params and byte inputs."""

    def __init__(self, queue: InProcessQueue, **kwargs: Any) -> None:
        super().__init__(queue, **kwargs)
        self.jobs: list[dict[str, Any]] = []

    async def handle(self, job: ClaimedJob) -> None:
        inputs = {name: await self.queue.load_input(job.job_id, name) for name in job.params.get("inputs", [])}
        self.jobs.append({"params": job.params, "inputs": inputs})
        await super().handle(job)


class LiveServer:
    """The API on a real socket, in a thread with its own event loop."""

    def __init__(self, capabilities: Any = None, image_size: int | None = None, **settings: Any) -> None:
        self.settings = make_settings(**settings)
        self.capabilities = capabilities  # None: the shipped model's
        self.worker_options = {} if image_size is None else {"image_size": image_size}
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.url = "http://127.0.0.1:%d" % self.sock.getsockname()[1]
        self.worker: RecordingWorker | None = None
        self.server: uvicorn.Server | None = None
        self.ready = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        queue = InProcessQueue(**QUEUE_LIMITS)
        app = create_app(self.settings, queue=queue, capabilities=self.capabilities)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.worker = RecordingWorker(queue, step_delay_s=0.03, **self.worker_options)
        async with self.worker:
            serve = asyncio.create_task(self.server.serve(sockets=[self.sock]))
            while not self.server.started and not serve.done():
                await asyncio.sleep(0.02)
            self.ready.set()
            await serve
        await queue.close()

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        assert self.ready.wait(15), "server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.should_exit = True
        self.thread.join(15)
        self.sock.close()


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    with LiveServer() as server:
        yield server


def finished_state(driver, timeout_s: float = 20) -> str:
    return wait_for(
        driver,
        lambda d: (s := d.find_element("id", "status").get_attribute("data-state")) in TERMINAL and s,
        timeout_s,
        "job did not finish",
    )


def field_error(driver, name: str) -> str:
    return driver.find_element("css selector", f'[data-error-for="{name}"]').text


def paint_two_regions(driver) -> None:
    type_prompt(driver, "a red circle and a blue square")
    select_phrase(driver, ["red", "circle"])
    paint_rect(driver, 4, 26, 17, 38)
    select_phrase(driver, ["blue", "square"], shift=True)
    paint_rect(driver, 47, 26, 60, 38)


def test_sends_exact_colour_map_and_shows_progress_result_history(browser, live) -> None:  # noqa: F811
    driver = browser
    open_page(driver, live.url)
    paint_two_regions(driver)
    regions = driver.execute_script(
        "return [...document.querySelectorAll('#regions li')].map(li => "
        "[li.dataset.phrase, getComputedStyle(li).getPropertyValue('--region').trim()])"
    )
    assert [phrase for phrase, _ in regions] == ["red circle", "blue square"]
    colors = {phrase: color for phrase, color in regions}
    assert colors["red circle"] != colors["blue square"]
    # the chips of painted phrases are marked
    assert len(driver.find_elements("css selector", "#chips .chip.painted")) == 4

    set_value(driver, "steps", "20")
    set_value(driver, "seed", "5")
    set_value(driver, "guidance", "2.5")
    set_value(driver, "sampler", "euler")
    n_before = len(live.worker.jobs)
    driver.find_element("id", "generate").click()
    # live progress: the bar moves through steps before the end
    wait_for(driver, lambda d: d.find_element("id", "progress-text").text.startswith("step "), 10, "no progress shown")
    assert finished_state(driver) == "succeeded"

    job = live.worker.jobs[n_before]
    params = job["params"]
    assert params["prompt"] == "a red circle and a blue square"
    # The shipped model makes one size: no width/height controls, none sent.
    assert not driver.find_element("id", "width-field").is_displayed()
    assert "width" not in params and "height" not in params
    assert (params["steps"], params["seed"], params["guidance_scale"], params["sampler"]) == (20, 5, 2.5, "euler")
    sent = {r["phrase"]: r for r in params["paint_with_words"]["regions"]}
    assert set(sent) == {"red circle", "blue square"}
    assert all(r["strength"] == 0.4 for r in sent.values())
    assert {r["color"] for r in sent.values()} == set(colors.values())

    # the colour map: 64x64, exactly the region colours plus white, each region where it was painted
    cmap = np.asarray(Image.open(io.BytesIO(job["inputs"]["color_map"])).convert("RGB"))
    assert cmap.shape == (MODEL_PX, MODEL_PX, 3)
    packed = {"#%02x%02x%02x" % tuple(px) for px in cmap.reshape(-1, 3)}
    assert packed == set(colors.values()) | {"#ffffff"}
    counts = painted_labels(driver)
    third = MODEL_PX // 3
    for phrase, columns in (("red circle", slice(0, third)), ("blue square", slice(2 * third + 1, MODEL_PX))):
        rgb = np.array([int(sent[phrase]["color"][i : i + 2], 16) for i in (1, 3, 5)])
        mask = np.all(cmap == rgb, axis=2)
        assert mask.sum() == counts[phrase] > 250
        assert mask[:, columns].sum() == mask.sum(), f"{phrase} painted outside its third"

    # the result, enlarged without blur, and the history entry with its parameters
    result = driver.find_element("id", "result")
    assert result.is_displayed()
    assert result.value_of_css_property("image-rendering") == "pixelated"
    assert result.size["width"] >= 4 * 8
    assert Image.open(io.BytesIO(result_png(driver))).format == "PNG"
    entries = driver.find_elements("css selector", "#history li")
    assert len(entries) == 1
    text = entries[0].text
    for part in ("a red circle and a blue square", "steps 20", "guidance 2.5", "seed 5", "euler", "“red circle” 0.40"):
        assert part in text, (part, text)

    # the history survives a reload; "Reuse" restores the parameters and the painting
    driver.refresh()
    wait_for(driver, lambda d: len(d.find_elements("css selector", "#history li")) == 1, 10, "history lost")
    driver.find_element("css selector", "#history li button").click()
    assert driver.find_element("id", "prompt").get_attribute("value") == "a red circle and a blue square"
    assert driver.find_element("id", "seed").get_attribute("value") == "5"
    wait_for(driver, lambda d: painted_labels(d) == counts, 5, "painting not restored")


def test_strength_and_eraser(browser, live) -> None:  # noqa: F811
    driver = browser
    open_page(driver, live.url)
    type_prompt(driver, "a green triangle")
    select_phrase(driver, ["green", "triangle"], shift=True)
    paint_rect(driver, 10, 10, 50, 50)
    full = painted_labels(driver)["green triangle"]
    driver.find_element("id", "eraser").click()
    paint_rect(driver, 30, 10, 50, 50)
    left = painted_labels(driver)["green triangle"]
    assert 0 < left < full
    slider = driver.find_element("css selector", "#regions li input[type=range]")
    assert (slider.get_attribute("min"), slider.get_attribute("max"), slider.get_attribute("value")) == ("0", "2", "0.4")
    driver.execute_script(
        "arguments[0].value = '1.25'; arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", slider
    )
    n_before = len(live.worker.jobs)
    driver.find_element("id", "generate").click()
    assert finished_state(driver) == "succeeded"
    (region,) = live.worker.jobs[n_before]["params"]["paint_with_words"]["regions"]
    assert region == {"color": region["color"], "phrase": "green triangle", "strength": 1.25}


def test_errors_are_shown_next_to_their_fields(browser, live) -> None:  # noqa: F811
    driver = browser
    open_page(driver, live.url)
    paint_two_regions(driver)
    set_value(driver, "steps", "0")
    driver.find_element("id", "generate").click()
    wait_for(driver, lambda d: field_error(d, "steps"), 10, "no error next to steps")
    assert "greater than or equal to 1" in field_error(driver, "steps")
    assert driver.find_element("id", "status").get_attribute("data-state") == "idle"

    # a painted phrase no longer in the prompt: the API's 422 names regions[1].phrase
    set_value(driver, "steps", "10")
    type_prompt(driver, "a red circle and a green square")
    driver.find_element("id", "generate").click()

    def region_error(d) -> str:
        return d.find_element(
            "css selector", '#regions li[data-phrase="blue square"] [data-role="phrase"]'
        ).text

    wait_for(driver, lambda d: "does not occur in the prompt" in region_error(d), 10, "no error on the region")
    assert "invalid" in driver.find_element("css selector", '#regions li[data-phrase="blue square"]').get_attribute(
        "class"
    )
    red_error = driver.find_element("css selector", '#regions li[data-phrase="red circle"] [data-role="phrase"]')
    assert red_error.text == ""

    # an empty prompt
    type_prompt(driver, " ")
    driver.find_element("id", "generate").click()
    wait_for(driver, lambda d: field_error(d, "prompt"), 10, "no error next to the prompt")


def test_cancel(browser, live) -> None:  # noqa: F811
    driver = browser
    open_page(driver, live.url)
    type_prompt(driver, "a purple circle")
    live.worker.mode = "hold"
    try:
        driver.find_element("id", "generate").click()
        cancel = driver.find_element("id", "cancel")
        wait_for(driver, lambda d: cancel.is_displayed() and live.worker.running.is_set(), 10, "job not running")
        cancel.click()
        assert finished_state(driver) == "canceled"
        assert not cancel.is_displayed()
        assert driver.find_element("id", "generate").is_enabled()
    finally:
        live.worker.mode = "succeed"


def test_api_key_is_asked_once_and_kept(browser) -> None:  # noqa: F811
    driver = browser
    with LiveServer(api_keys=["s3cret"]) as server:
        open_page(driver, server.url)
        type_prompt(driver, "a yellow square")
        driver.find_element("id", "generate").click()
        auth = driver.find_element("id", "auth")
        wait_for(driver, lambda d: auth.is_displayed(), 10, "no key prompt after a 401")
        driver.find_element("id", "api-key").send_keys("wrong")
        driver.find_element("id", "save-key").click()
        wait_for(driver, lambda d: "not accepted" in d.find_element("id", "auth-error").text, 10, "403 not shown")
        key = driver.find_element("id", "api-key")
        key.clear()
        key.send_keys("s3cret")
        driver.find_element("id", "save-key").click()  # retries the generation with the key
        assert finished_state(driver) == "succeeded"
        assert driver.execute_script("return localStorage.getItem('ediffi.apiKey')") == "s3cret"
        # a reload keeps the key: the next generation needs no prompt
        driver.refresh()
        type_prompt(driver, "a yellow square")
        driver.find_element("id", "generate").click()
        assert finished_state(driver) == "succeeded"
        assert not driver.find_element("id", "auth").is_displayed()
        assert len(server.worker.jobs) == 2


def test_style_image_preview_upload_and_error(browser, live, tmp_path) -> None:  # noqa: F811
    driver = browser
    open_page(driver, live.url)
    type_prompt(driver, "an orange triangle")
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    driver.find_element("id", "style-image").send_keys(str(bad))
    driver.find_element("id", "generate").click()
    wait_for(driver, lambda d: field_error(d, "style_image"), 10, "no error next to the style image")
    assert driver.find_element("id", "more").get_attribute("open") is not None  # opened to show it

    good = tmp_path / "style.png"
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 200, 30)).save(buffer, format="PNG")
    good.write_bytes(buffer.getvalue())
    driver.find_element("id", "clear-style").click()
    driver.find_element("id", "style-image").send_keys(str(good))
    preview = driver.find_element("id", "style-preview")
    wait_for(driver, lambda d: preview.is_displayed() and preview.get_attribute("naturalWidth") == "32", 5, "no preview")
    n_before = len(live.worker.jobs)
    driver.find_element("id", "generate").click()
    assert finished_state(driver) == "succeeded"
    job = live.worker.jobs[n_before]
    assert job["inputs"]["style_image"] == good.read_bytes()
    assert "paint_with_words" not in job["params"] or job["params"]["paint_with_words"] is None
    assert "style image" in driver.find_element("id", "result-caption").text


def test_an_imported_models_defaults_fill_the_form_and_a_changed_field_keeps_its_value(  # noqa: F811
    browser, imported_sdxl_dir
) -> None:
    """Against an API serving the imported SDXL (GET /v1/models: 50 steps, guidance 5, euler, 32 px;
    at most EDIFFI_MAX_STEPS 60), the form starts at those defaults and sends them; a field the user
    changed is kept when the listing is applied again."""
    from server.main import capabilities as read_capabilities

    driver = browser
    with LiveServer(capabilities=read_capabilities(imported_sdxl_dir), image_size=32, max_steps=60) as server:
        open_page(driver, server.url)
        wait_for(driver, lambda d: d.find_element("id", "steps").get_attribute("value") == "50", 10,
                 "the model's steps did not reach the form")
        values = {name: driver.find_element("id", name).get_attribute("value") for name in ("guidance", "sampler", "width")}
        assert values == {"guidance": "5", "sampler": "euler", "width": "32"}
        set_value(driver, "guidance", "2.5")
        driver.execute_script("applyCapabilities()")  # the listing arriving again: the user's value stays
        wait_for(driver, lambda d: d.find_element("id", "steps").get_attribute("max") == "60", 10, "no listing")
        assert driver.find_element("id", "guidance").get_attribute("value") == "2.5"
        type_prompt(driver, "a red circle")
        driver.find_element("id", "generate").click()
        assert finished_state(driver) == "succeeded"
        params = server.worker.jobs[-1]["params"]
        assert (params["steps"], params["guidance_scale"], params["sampler"]) == (50, 2.5, "euler")


def test_a_sampler_only_the_served_model_has_is_offered_and_sent(browser, imported_sd_dir) -> None:  # noqa: F811
    """The imported SD (its folder's PNDMScheduler: GET /v1/models lists ddim and pndm, default pndm):
    the page adds the samplers its static list lacks, starts at pndm and sends it."""
    from server.main import capabilities as read_capabilities

    driver = browser
    with LiveServer(capabilities=read_capabilities(imported_sd_dir), image_size=32, max_steps=60) as server:
        open_page(driver, server.url)
        wait_for(driver, lambda d: d.find_element("id", "sampler").get_attribute("value") == "pndm", 10,
                 "the model's default sampler did not reach the form")
        offered = driver.execute_script("return [...document.getElementById('sampler').options].map(o => o.value)")
        assert offered == ["heun", "euler", "dpmpp_2m", "euler_a", "unipc", "ddim", "pndm", "ddpm"]
        set_value(driver, "steps", "2")
        type_prompt(driver, "a red circle")
        driver.find_element("id", "generate").click()
        assert finished_state(driver) == "succeeded"
        params = server.worker.jobs[-1]["params"]
        assert (params["sampler"], params["use_karras_sigmas"]) == ("pndm", False)



def test_an_init_image_is_offered_where_the_model_takes_one_and_sent_with_its_strength(  # noqa: F811
    browser, live, imported_sd_dir, tmp_path
) -> None:
    """The shipped family (GET /v1/models init_image false) shows no init-image control; the imported
    SD does: the file and the strength go with the request (img2img) and the caption says so."""
    from server.main import capabilities as read_capabilities

    driver = browser
    open_page(driver, live.url)
    wait_for(driver, lambda d: d.execute_script("return typeof buildRequest === 'function'"), 5, "page not ready")
    assert not driver.find_element("id", "init-controls").is_displayed()
    init = tmp_path / "init.png"
    buffer = io.BytesIO()
    Image.new("RGB", (40, 24), (200, 30, 10)).save(buffer, format="PNG")
    init.write_bytes(buffer.getvalue())
    with LiveServer(capabilities=read_capabilities(imported_sd_dir), image_size=32, max_steps=60) as server:
        open_page(driver, server.url)
        wait_for(driver, lambda d: not d.execute_script("return document.getElementById('init-controls').hidden"), 10,
                 "no init-image control for a model that takes one")
        driver.find_element("id", "more").click()
        driver.find_element("id", "init-image").send_keys(str(init))
        preview = driver.find_element("id", "init-preview")
        wait_for(driver, lambda d: preview.is_displayed() and preview.get_attribute("naturalWidth") == "40", 5, "no preview")
        set_value(driver, "strength", "0.5")
        set_value(driver, "steps", "4")
        type_prompt(driver, "a red circle")
        driver.find_element("id", "generate").click()
        assert finished_state(driver) == "succeeded"
        job = server.worker.jobs[-1]
        assert job["inputs"]["init_image"] == init.read_bytes()
        assert (job["params"]["strength"], job["params"]["width"], job["params"]["height"]) == (0.5, 40, 24)
        assert "init image at strength 0.5" in driver.find_element("id", "result-caption").text
        assert "mask" not in job["inputs"]
        # a mask (inpainting): sent with the image; the strength follows inpainting's default while untouched
        mask = tmp_path / "mask.png"
        buffer = io.BytesIO()
        Image.new("L", (40, 24), 255).save(buffer, format="PNG")
        mask.write_bytes(buffer.getvalue())
        driver.refresh()
        wait_for(driver, lambda d: not d.execute_script("return document.getElementById('init-controls').hidden"), 10,
                 "no init-image control")
        driver.find_element("id", "more").click()
        driver.find_element("id", "init-image").send_keys(str(init))
        driver.find_element("id", "mask-image").send_keys(str(mask))
        mask_preview = driver.find_element("id", "mask-preview")
        wait_for(driver, lambda d: mask_preview.is_displayed(), 5, "no mask preview")
        assert driver.find_element("id", "strength").get_attribute("value") == "1"
        set_value(driver, "steps", "4")
        type_prompt(driver, "a red circle")
        driver.find_element("id", "generate").click()
        assert finished_state(driver) == "succeeded"
        job = server.worker.jobs[-1]
        assert job["inputs"]["mask"] == mask.read_bytes() and job["params"]["strength"] == 1.0
        assert "inpainted" in driver.find_element("id", "result-caption").text


# ------------------------------------------------------------------ mask brush

INIT_RGB = (200, 30, 10)
INIT_SIZE = (40, 24)  # the init image's width, height (the mask sent is this size)
IMG2IMG_STRENGTH, INPAINT_STRENGTH = "0.8", "1"  # GET /v1/models request.strength: default, default_with_mask


@pytest.fixture(scope="module")
def live_sd(imported_sd_dir) -> Iterator[LiveServer]:
    """The API serving the imported SD (GET /v1/models: init_image and mask)."""
    from server.main import capabilities as read_capabilities

    with LiveServer(capabilities=read_capabilities(imported_sd_dir), image_size=32, max_steps=60) as server:
        yield server


def png_file(path, image: Image.Image):
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    path.write_bytes(buffer.getvalue())
    return path


def open_with_init_image(driver, server: LiveServer, init) -> None:
    """The page with `init` chosen: the mask canvas shows it at its own size."""
    open_page(driver, server.url)
    wait_for(driver, lambda d: not d.execute_script("return document.getElementById('init-controls').hidden"), 10,
             "no init-image control")
    assert not driver.find_element("id", "mask-painter").is_displayed()  # no init image yet: nothing to paint on
    driver.find_element("id", "more").click()
    driver.find_element("id", "init-image").send_keys(str(init))
    canvas = driver.find_element("id", "mask-canvas")
    wait_for(driver, lambda d: canvas.is_displayed() and canvas.get_attribute("width") == str(INIT_SIZE[0]), 5,
             "no mask canvas for the init image")
    assert canvas.get_attribute("height") == str(INIT_SIZE[1])


def mask_stroke(driver, points: list[tuple[float, float]], brush: int) -> None:
    """A mouse drag through `points` (init-image pixels) on the mask canvas with a `brush`-pixel brush."""
    from selenium.webdriver.common.action_chains import ActionChains

    set_value(driver, "mask-brush-size", str(brush))
    canvas = driver.find_element("id", "mask-canvas")
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", canvas)
    width, height = int(canvas.get_attribute("width")), int(canvas.get_attribute("height"))
    shown = canvas.size  # CSS pixels

    def offset(x: float, y: float) -> tuple[int, int]:  # image px -> offset from the canvas centre
        return round(x / width * shown["width"] - shown["width"] / 2), round(y / height * shown["height"] - shown["height"] / 2)

    actions = ActionChains(driver, duration=10)
    actions.move_to_element_with_offset(canvas, *offset(*points[0])).click_and_hold()
    for point in points[1:]:
        actions.move_to_element_with_offset(canvas, *offset(*point))
    actions.release().perform()


def canvas_pixel(driver, x: int, y: int) -> tuple[int, ...]:
    return tuple(driver.execute_script(
        "return [...document.getElementById('mask-canvas').getContext('2d').getImageData(arguments[0], arguments[1], 1, 1).data]",
        x, y,
    ))


def distance_to_segment(a: tuple[float, float], b: tuple[float, float]) -> np.ndarray:
    """Each init-image pixel centre's distance to the segment a-b, as [height, width]."""
    ys, xs = np.mgrid[0 : INIT_SIZE[1], 0 : INIT_SIZE[0]] + 0.5
    (ax, ay), (bx, by) = a, b
    t = np.clip(((xs - ax) * (bx - ax) + (ys - ay) * (by - ay)) / ((bx - ax) ** 2 + (by - ay) ** 2), 0, 1)
    return np.hypot(xs - (ax + t * (bx - ax)), ys - (ay + t * (by - ay)))


def generate_job(driver, server: LiveServer) -> dict[str, Any]:
    n_before = len(server.worker.jobs)
    set_value(driver, "steps", "4")
    driver.find_element("id", "generate").click()
    assert finished_state(driver) == "succeeded"
    assert len(server.worker.jobs) == n_before + 1
    return server.worker.jobs[-1]


def sent_mask(job: dict[str, Any]) -> np.ndarray:
    """The mask the request carried: a PNG of the init image's size, only black and white."""
    image = Image.open(io.BytesIO(job["inputs"]["mask"]))
    assert (image.format, image.size) == ("PNG", INIT_SIZE)
    grey = np.asarray(image.convert("L"))
    assert set(np.unique(grey)) <= {0, 255}, np.unique(grey)
    return grey == 255


def test_a_mask_painted_on_the_init_image_is_sent_as_a_png_of_its_size(browser, live_sd, tmp_path) -> None:  # noqa: F811
    """A stroke on the mask canvas (real mouse events) becomes the `mask`: white under the stroke,
    black elsewhere, the init image's size; the eraser keeps pixels again; clearing sends no mask.
    The strength follows inpainting's default while the user has not set one."""
    driver = browser
    init = png_file(tmp_path / "init.png", Image.new("RGB", INIT_SIZE, INIT_RGB))
    open_with_init_image(driver, live_sd, init)
    type_prompt(driver, "a red circle")
    assert canvas_pixel(driver, 20, 12) == (*INIT_RGB, 255)  # the canvas shows the init image
    assert driver.find_element("id", "strength").get_attribute("value") == IMG2IMG_STRENGTH
    brush = driver.find_element("id", "mask-brush-size")
    assert driver.find_element("css selector", 'label[for="mask-brush-size"]').is_displayed()
    assert int(brush.get_attribute("max")) >= 6

    # a horizontal stroke, 4 px wide, through the middle row
    start, end = (8.0, 12.0), (32.0, 12.0)
    mask_stroke(driver, [start, (20.0, 12.0), end], brush=4)
    assert canvas_pixel(driver, 20, 12) != (*INIT_RGB, 255)  # tinted where painted
    assert canvas_pixel(driver, 20, 2) == (*INIT_RGB, 255)
    assert driver.find_element("id", "mask-preview").is_displayed()  # the mask to be sent, as a file's is
    assert driver.find_element("id", "strength").get_attribute("value") == INPAINT_STRENGTH
    job = generate_job(driver, live_sd)
    white = sent_mask(job)
    distance = distance_to_segment(start, end)
    assert white[distance <= 1.4].all(), "unpainted pixels under the stroke"
    assert not white[distance > 2.6].any(), "painted pixels away from the stroke"
    assert job["params"]["strength"] == 1.0
    assert job["inputs"]["init_image"] == init.read_bytes()
    assert "inpainted" in driver.find_element("id", "result-caption").text

    # the eraser (6 px) over the stroke's right part: those pixels are kept again
    driver.find_element("id", "mask-eraser").click()
    mask_stroke(driver, [(20.0, 12.0), (38.0, 12.0)], brush=6)
    white = sent_mask(generate_job(driver, live_sd))
    assert white[(distance <= 1.4) & (np.arange(INIT_SIZE[0]) < 16)].all()
    assert not white[:, 18:].any() and not white[distance > 2.6].any()

    # "Clear mask", from the keyboard: no mask is sent, the strength is img2img's again
    from selenium.webdriver.common.keys import Keys

    driver.find_element("id", "clear-mask-paint").send_keys(Keys.SPACE)
    wait_for(driver, lambda d: not d.find_element("id", "mask-preview").is_displayed(), 5, "the mask was not cleared")
    assert canvas_pixel(driver, 10, 12) == (*INIT_RGB, 255)
    mask_stroke(driver, [(10.0, 12.0), (30.0, 12.0)], brush=6)  # still erasing: nothing painted
    assert not driver.find_element("id", "mask-preview").is_displayed()
    assert driver.find_element("id", "strength").get_attribute("value") == IMG2IMG_STRENGTH
    job = generate_job(driver, live_sd)
    assert "mask" not in job["inputs"]
    assert job["params"]["strength"] == 0.8


def test_an_uploaded_mask_and_the_painted_one_are_one_mask(browser, live_sd, tmp_path) -> None:  # noqa: F811
    """A mask file replaces the painting and shows on the canvas (sent as uploaded); painting then
    edits it (the file's white plus the stroke, at the init image's size); Remove clears both."""
    driver = browser
    init = png_file(tmp_path / "init.png", Image.new("RGB", INIT_SIZE, INIT_RGB))
    right_half = np.zeros(INIT_SIZE[::-1], dtype=np.uint8)
    right_half[:, 20:] = 255
    mask = png_file(tmp_path / "mask.png", Image.fromarray(right_half, "L"))
    open_with_init_image(driver, live_sd, init)
    type_prompt(driver, "a red circle")

    mask_stroke(driver, [(4.0, 4.0), (12.0, 4.0)], brush=4)  # replaced by the file below
    assert canvas_pixel(driver, 8, 4) != (*INIT_RGB, 255)
    driver.find_element("id", "mask-image").send_keys(str(mask))
    wait_for(driver, lambda d: canvas_pixel(d, 30, 12) != (*INIT_RGB, 255), 5, "the mask file is not on the canvas")
    assert canvas_pixel(driver, 8, 4) == (*INIT_RGB, 255)
    assert driver.find_element("id", "strength").get_attribute("value") == INPAINT_STRENGTH
    job = generate_job(driver, live_sd)
    assert job["inputs"]["mask"] == mask.read_bytes()

    # a stroke on the left half adds to the file's mask
    start, end = (6.0, 12.0), (14.0, 12.0)
    mask_stroke(driver, [start, end], brush=4)
    white = sent_mask(generate_job(driver, live_sd))
    assert white[:, 20:].all()
    distance = distance_to_segment(start, end)
    left = np.arange(INIT_SIZE[0]) < 20
    assert white[(distance <= 1.4) & left].all() and not white[(distance > 2.6) & left].any()

    # Remove (the file's button) clears the painting too
    driver.find_element("id", "clear-mask").click()
    assert canvas_pixel(driver, 30, 12) == canvas_pixel(driver, 10, 12) == (*INIT_RGB, 255)
    assert driver.find_element("id", "strength").get_attribute("value") == IMG2IMG_STRENGTH
    assert "mask" not in generate_job(driver, live_sd)["inputs"]
