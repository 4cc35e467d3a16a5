"""The drawing page in a real headless chromium (Playwright): mouse strokes, live guesses, undo, clear."""
import json
import math
import re
from contextlib import contextmanager
from pathlib import Path

import pytest

from app.api import ServiceConfig, create_app
from app.service import Classifier
from tests.conftest import serving


def _chromium() -> Path | None:
    """Debian's chromium, else the build `playwright install chromium` fetched (where apt has none)."""
    if Path("/usr/bin/chromium").exists():
        return Path("/usr/bin/chromium")
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        bundled = Path(p.chromium.executable_path)
    return bundled if bundled.exists() else None


CHROMIUM = _chromium()
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium: run `bash scripts/setup.sh --browser`")


def served(classifier):
    config = ServiceConfig()
    return serving(create_app(classifier, config), config)


@pytest.fixture(scope="module", params=["torch", "onnxruntime"])
def server(request, shapes_classifier, shapes_onnx_classifier):
    """The page on the shapes model, on torch and on ONNX Runtime (its export)."""
    with served(shapes_classifier if request.param == "torch" else shapes_onnx_classifier) as url:
        yield url


@contextmanager
def opened(browser, url: str):
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    page.requests = []  # every URL the page asked for, with its body
    page.on("request", lambda r: page.requests.append((r.url, r.post_data)))
    page.goto(url + "/")
    page.wait_for_function("document.getElementById('model').textContent.includes('v2')")
    yield page
    page.close()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def browser_page(browser, server):
    with opened(browser, server) as page:
        yield page


def draw(page, points, pause_ms=0):
    """One mouse stroke through points given as fractions (0..1) of the canvas."""
    box = page.locator("#canvas").bounding_box()
    at = [(box["x"] + fx * box["width"], box["y"] + fy * box["height"]) for fx, fy in points]
    page.mouse.move(*at[0])
    page.mouse.down()
    for x, y in at[1:]:
        page.mouse.move(x, y, steps=4)
        if pause_ms:
            page.wait_for_timeout(pause_ms)
    page.mouse.up()


def guesses(page) -> list[tuple[str, str]]:
    rows = page.locator("#predictions li")
    return [(rows.nth(i).locator(".label").inner_text(), rows.nth(i).locator(".percent").inner_text())
            for i in range(rows.count())]


def wait_top(page, label: str):
    page.wait_for_function("label => document.querySelector('#predictions li .label')?.textContent === label",
                           arg=label, timeout=30_000)


def predict_bodies(page) -> list[dict]:
    return [json.loads(body) for url, body in page.requests if url.endswith("/predict")]


def test_draw_guess_undo_clear(browser_page, server, tmp_path_factory):
    page = browser_page
    assert page.locator("#predictions li").count() == 0 and page.locator("#undo").is_disabled()

    draw(page, [(0.1, 0.5), (0.5, 0.52), (0.9, 0.5)])
    wait_top(page, "line")
    shown = guesses(page)
    assert len(shown) == 5
    assert all(re.fullmatch(r"\d{1,3}\.\d%", percent) for _, percent in shown)
    widths = page.locator("#predictions .fill").evaluate_all("bars => bars.map(b => parseFloat(b.style.width))")
    assert widths == sorted(widths, reverse=True) and widths[0] > 50

    draw(page, [(0.5, 0.1), (0.52, 0.5), (0.5, 0.9)])
    wait_top(page, "plus")
    strokes = predict_bodies(page)[-1]["strokes"]  # recorded as the dataset: x, y, t per stroke
    assert [len(s) for s in strokes] == [3, 3]
    times = [t for s in strokes for t in s[2]]
    assert times[0] == 0 and times == sorted(times) and len(strokes[1][0]) == len(strokes[1][2]) >= 8
    page.screenshot(path=str(tmp_path_factory.mktemp("page") / "page.png"))

    page.click("#undo")
    assert page.locator("#canvas").get_attribute("data-strokes") == "1"
    wait_top(page, "line")

    page.click("#clear")
    assert page.locator("#canvas").get_attribute("data-strokes") == "0"
    assert page.locator("#predictions li").count() == 0 and page.locator("#placeholder").is_visible()
    ink = page.evaluate("""() => { const c = document.getElementById('canvas');
        return c.getContext('2d').getImageData(0, 0, c.width, c.height).data.some(v => v !== 0); }""")
    assert ink is False
    assert all(url.startswith(server) for url, _ in page.requests), "the page reached outside the app"


def test_asks_while_drawing_throttled(browser_page):
    page = browser_page
    page.keyboard.press("Escape")  # the Clear shortcut; a no-op on a blank pad
    assert page.locator("#canvas").get_attribute("data-strokes") == "0"
    # Timed inside the page, on one clock: Playwright may deliver a request event before mouse.up() returns.
    page.evaluate("""() => {
        const canvas = document.getElementById('canvas'), fetch = window.fetch;
        window.timing = { asks: [], down: null, up: null };
        canvas.addEventListener('pointerdown', () => { timing.down = performance.now(); }, { capture: true });
        canvas.addEventListener('pointerup', () => { timing.up = performance.now(); }, { capture: true });
        window.fetch = (url, options) => {
            if (String(url).endsWith('/predict')) timing.asks.push(performance.now());
            return fetch(url, options);
        };
    }""")
    draw(page, [(0.2 + 0.6 * i / 20, 0.3 + 0.02 * (i % 2)) for i in range(21)], pause_ms=60)  # ~1.2 s stroke
    page.wait_for_function("() => timing.asks.some(t => t >= timing.up)", timeout=5_000)  # asked on release
    page.wait_for_timeout(300)  # nothing more should come
    timing = page.evaluate("() => timing")
    during = [t for t in timing["asks"] if t < timing["up"]]
    assert 2 <= len(during) <= math.ceil((timing["up"] - timing["down"]) / 250) + 1
    assert len(timing["asks"]) == len(during) + 1  # exactly one ask on release, none after
    page.wait_for_function("document.querySelectorAll('#predictions li').length === 5")


def test_docs_page_renders_offline(browser_page, server):
    """Swagger UI from the app's own files only: /docs must work offline."""
    page = browser_page.context.browser.new_page()
    asked = []
    page.on("request", lambda r: asked.append(r.url))
    page.goto(server + "/docs")
    page.wait_for_selector(".opblock-summary-path", timeout=30_000)  # drawn from /openapi.json
    paths = page.locator(".opblock-summary-path").evaluate_all("els => els.map(e => e.dataset.path)")
    assert {"/predict", "/predict/image", "/health", "/classes"} <= set(paths)
    outside = [url for url in asked if not url.startswith((server, "data:", "blob:"))]  # inline, not fetched
    assert len(asked) >= 4 and not outside, outside
    page.close()


def test_unsure_answers_are_shown_as_guesses_without_bars(browser, shapes_onnx_classifier):
    always = Classifier(shapes_onnx_classifier.backend, unsure_below=1.0)  # every answer is below 1
    with served(always) as url, opened(browser, url) as page:
        assert page.locator("#not-sure").is_hidden()
        draw(page, [(0.1, 0.5), (0.5, 0.52), (0.9, 0.5)])
        wait_top(page, "line")
        page.wait_for_timeout(500)  # every answer is unsure: the last one too
        assert page.locator("#not-sure").is_visible() and "Not sure" in page.locator("#not-sure").inner_text()
        assert page.locator("#predictions li").count() == 5 and page.locator("#predictions .bar").count() == 0
        page.click("#clear")
        assert page.locator("#not-sure").is_hidden()
    with served(shapes_onnx_classifier) as url, opened(browser, url) as page:  # 0.5: a clear line is sure
        draw(page, [(0.1, 0.5), (0.5, 0.52), (0.9, 0.5)])
        wait_top(page, "line")  # answers to the unfinished stroke may come first: wait for the last one
        page.wait_for_function("document.getElementById('not-sure').hidden && "
                               "document.querySelectorAll('#predictions .bar').length === 5", timeout=30_000)
