"""The web page in headless Chromium against a real API, a real worker and a real Redis.

One scenario, as a user would go through it: the page says the service is not ready (no
worker yet) and that the server wants an API key; the user gives the key, provokes a
validation error, sees the banner go when the worker comes up, tabs through the form,
submits a prompt from the keyboard and gets its images, downloads one, reproduces it with
"same seed again", watches a long job's progress and live preview and cancels it, reloads
(the history stays), and looks at the page on a phone-width screen. The finished page is
saved as a screenshot: to the path in PROMPTPIX_SCREENSHOT when set (then with the demo
model, for the README: `PROMPTPIX_SCREENSHOT=docs/screenshot.png`), else to a temp dir.
Then the Score panel (an upload and a generated image ranked against captions) and
"continue from row N" on a finished image, each against a service of its own."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis
from PIL import Image

from app.redis_server import free_port
from tests.e2e.test_serving import tiny_checkpoint  # noqa: F401 - shared session fixture
from tests.worker.helpers import (
    ROOT,
    Proc,
    make_tiny_checkpoint,
    start_api,
    start_worker,
    wait_for,
)

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="Playwright for Python is not installed (`pip install playwright`): "
    "the web page was not tested in a browser",
)
expect = sync_api.expect
Page = sync_api.Page
Locator = sync_api.Locator

API_KEY = "e2e-secret-key-0123456"
SCREENSHOT = os.environ.get("PROMPTPIX_SCREENSHOT")
DEMO = ROOT / "checkpoints" / "demo" / "shapes16.pth"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
USE_DEMO = bool(SCREENSHOT) and DEMO.is_file()


def _demo_prompt() -> str:
    from model import load_checkpoint

    return str(load_checkpoint(DEMO)[1]["example_prompts"][0])


PROMPT = _demo_prompt() if USE_DEMO else "a red square"
# 16×16 images: 16 rows of progress each, enough to watch, and cheap on a CPU. The
# weights are barely trained (the images are noise): what is tested is the page.
IMAGE_SIZE = 16
TRAIN_STEPS = 3
# The job to cancel asks for many images (with guidance: twice the batch), so that it
# samples for a while; the worker is also paused (SIGSTOP) from the moment it is seen
# sampling until it has been told to cancel, so the job cannot finish first however fast
# the machine (CI once saw 256 images finish during the queue-and-cancel step).
CANCEL_IMAGES = 256

# Records what the page shows of each job, keyed by job id, however quickly the worker
# samples: every value its progress bar takes and the progress of every preview it draws.
RECORD_PAGE = """
window.__progress = {};
window.__previews = {};
const jobOf = (el) => el.closest("[data-job-id]").dataset.jobId;
const note = (log, id, value) => (log[id] = log[id] || []).push(value);
new MutationObserver((records) => {
  for (const { target } of records) {
    if (target instanceof HTMLProgressElement && target.hasAttribute("value")) {
      note(window.__progress, jobOf(target), target.value);
    } else if (target.matches(".preview-canvas")) {
      note(window.__previews, jobOf(target), Number(target.dataset.progress));
    }
  }
}).observe(document, { subtree: true, attributes: true,
                       attributeFilter: ["value", "data-progress"] });
"""


def newest_job(page: Page) -> tuple[str, Locator]:
    """The id and the list item of the job card at the top of the list."""
    job_id = page.locator("[data-job-id]").first.get_attribute("data-job-id")
    return job_id, page.locator(f'[data-job-id="{job_id}"]')


def find_chromium() -> str | None:
    for candidate in ("/usr/bin/chromium", "chromium", "chromium-browser"):
        path = shutil.which(candidate)
        if path:
            return path
    return None


@pytest.fixture(scope="module")
def browser() -> Iterator[sync_api.Browser]:
    """Headless Debian Chromium driven by Playwright; skip, naming what is missing."""
    executable = find_chromium()
    if executable is None:
        pytest.skip("Chromium is not installed (`apt-get install chromium`); "
                    "the web page was not tested in a browser")
    with sync_api.sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if USE_DEMO:
        return DEMO  # the README's picture shows real samples
    path = tmp_path_factory.mktemp("web") / "tiny.pth"
    return make_tiny_checkpoint(path, steps=TRAIN_STEPS, image_size=IMAGE_SIZE)


class Service:
    """A real API (keys on) on a free port; the worker is started when the test says so."""

    def __init__(self, redis_url: str, checkpoint: Path, logs: Path) -> None:
        self.redis_url = redis_url
        self.checkpoint = checkpoint
        self.logs = logs
        self.procs: list[Proc] = []
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/"
        self.procs.append(start_api(redis_url, port, logs / "api.log",
                                    PROMPTPIX_API_KEYS=API_KEY,
                                    PROMPTPIX_MAX_IMAGES=str(CANCEL_IMAGES)))

    def start_worker(self) -> None:
        # Default liveness (a 15 s heartbeat key): the worker is paused for a few seconds
        # in watch_and_cancel and must not be taken for dead meanwhile.
        self.procs.append(start_worker(self.redis_url, self.checkpoint, self.logs / "worker.log",
                                       PROMPTPIX_HEARTBEAT_INTERVAL="5"))

    def pause_worker(self, pause: bool) -> None:
        """Freeze (SIGSTOP) or thaw (SIGCONT) the worker process: no timing races."""
        self.procs[-1].proc.send_signal(signal.SIGSTOP if pause else signal.SIGCONT)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()
        for proc in self.procs:  # shown by pytest only when the test fails
            print(f"--- {proc.log_path.name} (exit {proc.proc.returncode}) ---")
            print(proc.log()[-3000:])


@pytest.fixture
def service(redis_url: str, checkpoint: Path, tmp_path: Path) -> Iterator[Service]:
    running = Service(redis_url, checkpoint, tmp_path)
    try:
        yield running
    finally:
        running.stop()


@dataclass
class Seen:
    """What the page showed of one job (from RECORD_PAGE)."""

    progress: list[float] = field(default_factory=list)
    previews: list[float] = field(default_factory=list)


def seen(page: Page, job_id: str) -> Seen:
    return Seen(page.evaluate("id => window.__progress[id] || []", job_id),
                page.evaluate("id => window.__previews[id] || []", job_id))


def give_key_while_not_ready(page: Page, service: Service) -> None:
    """No worker yet: a banner says so; keys are on: the page asks for one."""
    expect(page.locator("#ready-banner")).to_contain_text("not ready")
    expect(page.locator("#form-error")).to_contain_text("needs an API key")
    service.start_worker()
    page.get_by_label("API key", exact=True).fill(API_KEY)
    page.get_by_role("button", name="Save key").click()
    expect(page.get_by_role("status").filter(has_text="Key saved")).to_be_visible()


def provoke_validation_error(page: Page) -> None:
    """A value the server rejects: its 422 is shown next to the field it names."""
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    temperature = page.get_by_label("Temperature")
    temperature.fill("5")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("alert").filter(has_text="Temperature")).to_be_visible()
    expect(temperature).to_have_attribute("aria-invalid", "true")
    expect(page.locator("#temperature-error")).to_be_visible()
    expect(temperature).to_be_focused()
    temperature.fill("1")


def wait_until_ready(page: Page) -> None:
    """The worker comes up: the banner goes and its model's example prompts appear."""
    # A worker loads its model in seconds, or a minute on a loaded 2-core CI machine.
    expect(page.locator("#ready-banner")).to_be_hidden(timeout=90_000)
    examples = page.get_by_role("list", name="Example prompts")
    expect(examples.get_by_role("button", name=PROMPT, exact=True)).to_be_visible()
    expect(page.locator("#model-info")).to_contain_text(f"{IMAGE_SIZE}×{IMAGE_SIZE}")


def check_keyboard_order(page: Page) -> None:
    """Tab walks the form in reading order, and the focused control shows a focus ring."""
    page.get_by_label("Prompt", exact=True).focus()
    examples = page.get_by_role("list", name="Example prompts").get_by_role("button")
    chips = [t.strip() for t in examples.all_text_contents()]
    assert PROMPT in chips
    names: list[str] = []
    while len(names) < 40 and (not names or names[-1] != "Generate"):
        page.keyboard.press("Tab")
        names.append(page.evaluate(
            "() => { const el = document.activeElement;"
            " return (el.labels && el.labels[0] || el).textContent.trim(); }"))
        outline = page.evaluate("() => getComputedStyle(document.activeElement).outlineStyle")
        assert outline != "none", f"no visible focus on {names[-1]!r}"
    assert names == [*chips, "Number of images", "Temperature", "Top-k", "Top-p",
                     "Guidance scale", "Seed", "Random seed", "Generate"]


def download_first_image(page: Page, job: Locator) -> Image.Image:
    """Click "Download image 1" of `job`; return the PNG as a Pillow image."""
    with page.expect_download() as download:
        job.get_by_role("link", name="Download image 1").click()
    data = Path(download.value.path()).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    return Image.open(io.BytesIO(data))


def generate_from_keyboard(page: Page) -> tuple[str, Locator]:
    """A real job, submitted with Ctrl+Enter: its images appear, enlarged and crisp."""
    page.get_by_label("Number of images").fill("8")
    page.get_by_label("Guidance scale").fill("3")
    page.get_by_label("Seed").fill("7")
    page.get_by_label("Prompt", exact=True).press("Control+Enter")
    expect(page.get_by_role("article", name=PROMPT)).to_have_count(1)
    expect(page.locator("#form-error")).to_be_hidden()
    job_id, job = newest_job(page)
    expect(job.get_by_role("status")).to_have_text("Done: 8 images")
    images = job.get_by_role("list").get_by_role("img")
    expect(images).to_have_count(8)
    for n in range(8):
        assert images.nth(n).evaluate("img => img.complete && img.naturalWidth") == IMAGE_SIZE
    assert images.first.evaluate("img => img.getBoundingClientRect().width") >= 4 * IMAGE_SIZE
    assert images.first.evaluate("img => getComputedStyle(img).imageRendering") == "pixelated"
    progress = seen(page, job_id).progress
    assert progress == sorted(progress) and progress[-1] == 1, f"progress: {progress}"
    expect(job.locator(".job-preview")).to_be_hidden()  # the final images replace it
    return job_id, job


def same_seed_again(page: Page, job: Locator, png: Image.Image) -> str:
    """ "Same seed again" puts the parameters back in the form and reproduces the images."""
    job.get_by_role("button", name="Same seed again").click()
    expect(page.get_by_role("article", name=PROMPT)).to_have_count(2)
    again_id, again = newest_job(page)
    expect(page.get_by_label("Seed")).to_have_value("7")
    expect(again.get_by_role("status")).to_have_text("Done: 8 images")
    assert download_first_image(page, again).tobytes() == png.tobytes()
    return again_id


def queue_and_cancel(page: Page) -> None:
    """While the worker is busy, a new job shows its place in the queue; canceled there."""
    page.get_by_label("Number of images").fill("1")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("article", name=PROMPT)).to_have_count(4)
    job_id, job = newest_job(page)
    expect(job.get_by_role("status")).to_have_text("Queued: next in line")
    job.get_by_role("button", name="Cancel").click()
    expect(job.get_by_role("status")).to_have_text("Canceled")
    job.get_by_role("button", name="Remove").click()
    expect(page.locator(f'[data-job-id="{job_id}"]')).to_have_count(0)


def watch_and_cancel(page: Page, service: Service) -> str:
    """A long job: progress rises and the live preview is drawn while it samples; another
    job queues behind it; then it is canceled, and keeps the preview of how far it got."""
    page.get_by_label("Number of images").fill(str(CANCEL_IMAGES))
    page.get_by_label("Guidance scale").fill("2")
    page.get_by_role("button", name="Random seed").click()
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_role("article", name=PROMPT)).to_have_count(3)
    job_id, job = newest_job(page)
    page.wait_for_function("id => (window.__previews[id] || []).length > 0", arg=job_id)
    expect(job.get_by_role("status")).to_contain_text("Sampling: ")
    service.pause_worker(True)
    try:
        queue_and_cancel(page)
        job.get_by_role("button", name="Cancel").click()
    finally:
        service.pause_worker(False)
    expect(job.get_by_role("status")).to_have_text("Canceled")
    progress = seen(page, job_id).progress
    assert any(0 < p < 1 for p in progress), f"no progress between 0 and 1 shown: {progress}"
    assert progress == sorted(progress), f"the progress shown went down: {progress}"
    preview = job.get_by_role("img", name="Preview of the rows sampled so far")
    expect(preview).to_be_visible()
    assert 0 < float(preview.get_attribute("data-progress")) < 1
    expect(job.get_by_role("button", name="Cancel")).to_be_hidden()
    expect(job.get_by_role("button", name="Same seed again")).to_be_visible()
    return job_id


def check_phone_width(page: Page) -> None:
    """On a phone-width screen: one column, nothing wider than the screen."""
    page.set_viewport_size({"width": 375, "height": 812})
    assert page.evaluate("document.documentElement.scrollWidth") <= 375
    lefts = page.locator(".panel").evaluate_all(
        "panels => panels.map((p) => Math.round(p.getBoundingClientRect().left))")
    assert len(set(lefts)) == 1, f"the panels are not in one column: {lefts}"


def test_web_page_end_to_end(browser: sync_api.Browser, service: Service,
                             tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    context.add_init_script(RECORD_PAGE)
    page = context.new_page()
    page_errors: list[str] = []
    page.on("pageerror", lambda error: page_errors.append(str(error)))
    # Anything the Content-Security-Policy blocked (an inline script or style, a CDN).
    blocked: list[str] = []
    page.on("console", lambda m: blocked.append(m.text)
            if "Content Security Policy" in m.text else None)
    try:
        page.goto(service.url)
        give_key_while_not_ready(page, service)
        provoke_validation_error(page)
        wait_until_ready(page)
        check_keyboard_order(page)

        first_id, first = generate_from_keyboard(page)
        png = download_first_image(page, first)
        assert png.size == (IMAGE_SIZE, IMAGE_SIZE)
        assert PROMPT in json.dumps(png.text), f"the prompt is not in the PNG's text: {png.text}"
        again_id = same_seed_again(page, first, png)
        canceled_id = watch_and_cancel(page, service)
        expect(first.get_by_role("list").get_by_role("img")).to_have_count(8)  # untouched

        # The history survives a reload (localStorage): same jobs, same order, same states.
        page.reload()
        ids = page.locator("[data-job-id]").evaluate_all("els => els.map((e) => e.dataset.jobId)")
        assert ids == [canceled_id, again_id, first_id]
        expect(page.locator(f'[data-job-id="{canceled_id}"]').get_by_role("status")
               ).to_have_text("Canceled")
        expect(first.get_by_role("list").get_by_role("img")).to_have_count(8)

        page.get_by_label("Prompt", exact=True).fill(PROMPT)
        page.evaluate("window.scrollTo(0, 0)")
        page.locator("body").click(position={"x": 1, "y": 1})  # no focus ring in the picture
        shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "screenshot.png"
        page.screenshot(path=str(shot), full_page=True)

        check_phone_width(page)
        assert page_errors == [], f"JavaScript errors on the page: {page_errors}"

        # /docs works under the same CSP: Swagger UI from this server renders the API.
        page.goto(service.url + "docs")
        expect(page.get_by_text("/v1/generations/{job_id}").first).to_be_visible()
        assert blocked == [], f"blocked by the Content-Security-Policy: {blocked}"
    finally:
        context.close()


# A page following five jobs that keep running must stay under the server's default rate
# limit (600 requests a minute per key or address) with room for a second tab.
WATCHED_JOBS = 5
WATCH_S = 20.0
MAX_PAGE_REQUESTS_PER_S = 5.0


def test_a_page_following_five_running_jobs_stays_within_the_rate_limit(
        browser: sync_api.Browser, redis_url: str, tmp_path: Path,
        tiny_checkpoint: Path) -> None:  # noqa: F811
    """Five jobs run together (MAX_BATCH=5, slowed by the worker's test hook) while the
    page follows them from its history; every request it sends is counted."""
    import httpx

    from worker.protocol import GenerationParams, JobStore, Settings

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    procs = [start_api(redis_url, port, tmp_path / "api.log")]  # default limits
    store = JobStore(redis.Redis.from_url(redis_url), Settings(redis_url=redis_url),
                     model=tiny_checkpoint.stem)
    # The first job's hook slows every row of the batch it leads (its mates wait for it).
    ids = [store.create_job(GenerationParams(prompt="a red square", seed=k),
                            test_hooks={"row_delay": 4.0} if k == 0 else None)[0]
           for k in range(WATCHED_JOBS)]
    procs.append(start_worker(redis_url, tiny_checkpoint, tmp_path / "worker.log",
                              PROMPTPIX_MAX_BATCH=str(WATCHED_JOBS)))
    context = browser.new_context()
    context.add_init_script(RECORD_PAGE)
    page = context.new_page()
    answers: list[tuple[float, int, str]] = []
    page.on("response", lambda r: answers.append((time.monotonic(), r.status, r.url))
            if "/v1/" in r.url else None)
    try:
        def all_running() -> bool:
            return all(httpx.get(f"{url}/v1/generations/{i}").json()["status"] == "running"
                       for i in ids)

        wait_for(all_running, 60, "the five jobs to run together", every=0.5)
        page.goto(url)
        history = [{"id": i, "prompt": "a red square", "params": {}, "status": "queued"}
                   for i in ids]
        page.evaluate("h => localStorage.setItem('promptpix.jobs', JSON.stringify(h))",
                      history)
        page.reload()
        assert not page.evaluate("document.hidden")  # polls at the visible page's pace
        start = time.monotonic()
        page.wait_for_timeout(WATCH_S * 1000)
        window = [a for a in answers if a[0] >= start]
        statuses = sorted({status for _, status, _ in answers})
        assert statuses == [200], f"the page got {statuses}"
        rate = len(window) / WATCH_S
        print(f"page sent {rate:.1f} API requests/s following {WATCHED_JOBS} running jobs")
        assert rate <= MAX_PAGE_REQUESTS_PER_S, f"{rate:.1f} requests/s"
        # One multiplexed event stream follows the five jobs; their states are not polled.
        streams = [u for _, _, u in answers if "/v1/events?ids=" in u]
        polls = [u for _, _, u in window if u.rstrip("/").rsplit("/", 1)[-1] in ids]
        assert len(streams) == 1 and all(i in streams[0] for i in ids), streams
        assert polls == [], polls
        for job_id in ids:  # and it still shows each job's progress and preview move
            shown = seen(page, job_id)
            assert len(set(shown.progress)) >= 2 and shown.previews, (job_id, shown)
    finally:
        context.close()
        for proc in reversed(procs):
            proc.stop()


# ---- the Score panel and "continue from row N" ------------------------------------------

def open_ready_page(browser: sync_api.Browser, service: Service,
                    errors: list[str]) -> tuple[sync_api.BrowserContext, Page]:
    """A page with the API key given and the worker up; JavaScript errors and anything the
    Content-Security-Policy blocked are appended to `errors`."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(30_000)
    page = context.new_page()
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("console", lambda m: errors.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.goto(service.url)
    give_key_while_not_ready(page, service)
    wait_until_ready(page)
    return context, page


def generate(page: Page, num_images: int, seed: int) -> tuple[str, Locator]:
    """Submit PROMPT for `num_images` images with `seed`; the finished job's id and card."""
    page.get_by_label("Prompt", exact=True).fill(PROMPT)
    page.get_by_label("Number of images").fill(str(num_images))
    page.get_by_label("Seed").fill(str(seed))
    before = page.locator("[data-job-id]").count()
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("[data-job-id]")).to_have_count(before + 1)
    job_id, job = newest_job(page)
    expect(job.get_by_role("status")).to_have_text(f"Done: {num_images} images")
    return job_id, job


def api_png(service: Service, path: str) -> Image.Image:
    """An image of the API (with the key), as the page would fetch it."""
    import httpx

    answer = httpx.get(service.url.rstrip("/") + path,
                       headers={"Authorization": f"Bearer {API_KEY}"})
    answer.raise_for_status()
    return Image.open(io.BytesIO(answer.content)).convert("RGB")


def check_score_result(page: Page, captions: list[str]) -> None:
    """One bar per caption, most probable first, summing to 100 %, and the heatmap."""
    expect(page.locator("#score-status")).to_have_text(f"Done: {len(captions)} captions ranked")
    bars = page.get_by_role("list", name="Ranking, most probable first").get_by_role("listitem")
    expect(bars).to_have_count(len(captions))
    shown = bars.locator(".score-caption").all_text_contents()
    assert sorted(shown) == sorted(captions), shown
    values = bars.locator("meter").evaluate_all("ms => ms.map((m) => m.value)")
    assert values == sorted(values, reverse=True), f"not ranked: {values}"
    assert abs(sum(values) - 1) < 1e-6, f"probabilities sum to {sum(values)}"
    percents = [float(t.replace("< 0.1 %", "0").rstrip(" %"))
                for t in bars.locator(".score-percent").all_text_contents()]
    assert abs(sum(percents) - 100) <= 0.1 * len(captions), percents
    assert all("bits/dim" in t for t in bars.locator(".hint").all_text_contents())
    expect(page.locator("#score-bpd")).to_contain_text("Without a caption: ")
    heatmap = page.get_by_role("img", name="Surprise heatmap of the image under")
    expect(heatmap).to_be_visible()
    page.wait_for_function("img => img.complete && img.naturalWidth > 0",
                           arg=heatmap.element_handle())


def test_score_panel_ranks_captions_of_an_upload_and_of_a_generated_image(
        browser: sync_api.Browser, service: Service, tmp_path: Path) -> None:
    """An uploaded PNG (a shapes-dataset rendering) and a generated image are scored
    against two captions each: two ranked bars summing to 100 %, bits/dim, the heatmap."""
    from training.datasets.shapes import render

    pixels, caption, _ = render(0, IMAGE_SIZE)
    upload = tmp_path / "shape.png"
    Image.fromarray(pixels).save(upload)
    errors: list[str] = []
    context, page = open_ready_page(browser, service, errors)
    posted: list[dict] = []
    page.on("request", lambda r: posted.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith("/v1/scores") else None)
    try:
        # Nothing chosen yet: the page says what is missing, next to the form.
        page.get_by_role("button", name="Score", exact=True).click()
        expect(page.locator("#score-error")).to_contain_text("Choose an image file")

        page.get_by_label("Image file").set_input_files(upload)
        expect(page.get_by_role("img", name="The image to score: shape.png")).to_be_visible()
        captions = [caption, "a blue square"]
        page.get_by_label("Captions").fill("\n".join(captions) + "\n\n")  # blank lines dropped
        page.get_by_role("button", name="Score", exact=True).click()
        check_score_result(page, captions)
        assert posted[-1]["captions"] == captions
        assert Image.open(io.BytesIO(base64.b64decode(posted[-1]["image"]))
                          ).tobytes() == Image.open(upload).tobytes()

        # A generated image, by reference: its card's "Score image 2" button.
        job_id, job = generate(page, num_images=2, seed=11)
        job.get_by_role("button", name="Score image 2").click()
        expect(page.get_by_label("Captions")).to_be_focused()
        expect(page.locator("#score-source-text")).to_have_text(f"Image 2 of “{PROMPT}”")
        own = [PROMPT, "a green square"]
        page.get_by_label("Captions").fill("\n".join(own))
        page.get_by_label("Captions").press("Control+Enter")
        check_score_result(page, own)
        assert posted[-1] == {"job_id": job_id, "image_index": 1, "captions": own}
        assert errors == [], errors
    finally:
        context.close()


KEEP_ROWS = 5


def test_continue_from_row_keeps_the_top_rows_of_the_picked_image(
        browser: sync_api.Browser, service: Service) -> None:
    """"Continue from row N" on image 2 of a finished job submits the same prompt and
    settings with that image as `init_image` and `keep_rows: N`; every image of the new
    job has exactly those top rows."""
    errors: list[str] = []
    context, page = open_ready_page(browser, service, errors)
    posted: list[dict] = []
    page.on("request", lambda r: posted.append(r.post_data_json)
            if r.method == "POST" and r.url.endswith("/v1/generations") else None)
    try:
        source_id, source = generate(page, num_images=2, seed=5)
        rows = source.get_by_label("Rows to keep")
        expect(rows).to_have_value(str(IMAGE_SIZE // 2))
        assert rows.get_attribute("max") == str(IMAGE_SIZE - 1)
        rows.fill(str(IMAGE_SIZE))  # out of range: said in the card, nothing sent
        source.get_by_role("button", name=f"Continue from row {IMAGE_SIZE}").click()
        expect(source.get_by_role("alert")).to_contain_text(f"from 1 to {IMAGE_SIZE - 1}")
        expect(rows).to_have_attribute("aria-invalid", "true")
        assert len(posted) == 1  # the source job's
        source.get_by_label("Image to continue").select_option(label="Image 2")
        rows.fill(str(KEEP_ROWS))
        source.get_by_role("button", name=f"Continue from row {KEEP_ROWS}").click()

        page.wait_for_function(  # a new card, or the card says why not
            "() => document.querySelectorAll('[data-job-id]').length === 2"
            " || !document.querySelector('.job-error').hidden")
        assert len(posted) == 2, "nothing was submitted"
        body = posted[-1]
        assert body["keep_rows"] == KEEP_ROWS and body["prompt"] == PROMPT
        assert body["num_images"] == 2 and "seed" not in body
        picked = api_png(service, f"/v1/generations/{source_id}/images/1.png")
        sent = Image.open(io.BytesIO(base64.b64decode(body["init_image"])))
        assert sent.convert("RGB").tobytes() == picked.tobytes()

        expect(source.locator(".job-error")).to_be_hidden()
        new_id, new = newest_job(page)
        assert new_id != source_id
        expect(new.get_by_role("status")).to_have_text("Done: 2 images")
        expect(new.locator(".job-meta")).to_contain_text(f"continued from row {KEEP_ROWS}")
        expect(new.get_by_role("button", name="Same seed again")).to_be_hidden()
        top = (0, 0, IMAGE_SIZE, KEEP_ROWS)
        for n in range(2):
            image = api_png(service, f"/v1/generations/{new_id}/images/{n}.png")
            assert image.crop(top).tobytes() == picked.crop(top).tobytes(), f"image {n}"
        assert errors == [], errors
    finally:
        context.close()
