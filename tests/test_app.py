"""The browser app (`amt app`) in a real browser: Debian's Chromium driven by Playwright, the shipped backbone and
pool, real glyph image files uploaded through the page.

Needs ``pip install -e '.[app]'`` (Gradio, Playwright's Python API) and a Chromium executable (``apt-get install
chromium``; ``.ci/run`` installs it). Without them the tests are skipped with the reason. ``AMT_APP_SCREENSHOTS=DIR``
saves the page after a prediction and after an attack (how docs/figures/app_*.png are made).
"""

import os
import shutil
import socket
from pathlib import Path

import pytest

from amt.app import SLOTS, example_task, support_from_slots
from amt.classify import FewShotClassifier
from amt.config import load_config
from amt.data.base import DataError

CHROMIUM = os.environ.get("AMT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")


def test_support_slots_become_named_classes():
    support = support_from_slots(["cat", "", "dog"], [["a.png"], ["b.png", "c.png"], None])
    assert support == {"cat": ["a.png"], "class 2": ["b.png", "c.png"]}
    with pytest.raises(DataError, match="at least 2 classes"):
        support_from_slots(["cat", "dog"], [["a.png"], []])
    with pytest.raises(DataError, match="two classes are named 'cat'"):
        support_from_slots(["cat", "cat"], [["a.png"], ["b.png"]])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser_page():
    pytest.importorskip("gradio", reason="the browser app needs Gradio: pip install -e '.[app]'")
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs Playwright: pip install -e '.[app]'")
    if CHROMIUM is None:
        pytest.skip("no Chromium executable (apt-get install chromium, or set AMT_CHROMIUM)")
    from amt.app import serve

    port = _free_port()
    server = serve(load_config("configs/embedded.yaml"), "embedded:glyph_pool", port, block=False)
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        page.set_default_timeout(90_000)
        page.goto(f"http://127.0.0.1:{port}/")
        try:
            yield page
        finally:
            browser.close()
            server.close()


def _screenshot(page, name: str) -> None:
    folder = os.environ.get("AMT_APP_SCREENSHOTS")
    if folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(folder) / name), full_page=True)


def test_uploaded_images_are_classified_and_attacked_in_the_page(browser_page):
    page = browser_page
    cfg = load_config("configs/embedded.yaml")
    support, queries = example_task(cfg, "greek", n_shot=2, n_query=1, seed=3)
    assert len(support) == SLOTS
    for k, (name, paths) in enumerate(support.items()):
        page.locator(f"#amt-name-{k} textarea, #amt-name-{k} input").first.fill(name)
        page.locator(f"#amt-support-{k} input[type=file]").set_input_files(paths)
    page.locator("#amt-queries input[type=file]").set_input_files(queries)
    for k in range(SLOTS):  # wait until every upload is listed before classifying
        page.locator(f"#amt-support-{k} td.filename").nth(len(support[list(support)[k]]) - 1).wait_for()
    page.locator("#amt-queries td.filename").nth(len(queries) - 1).wait_for()
    page.locator("#amt-classify").click()
    rows = page.locator("#amt-prediction-table tbody tr")
    rows.nth(len(queries) - 1).wait_for()
    assert rows.count() == len(queries)

    # the page shows what the Python API predicts for the same files
    shown = {m: [rows.nth(i).locator(f"td.amt-{m.lower()}").get_attribute("data-label") for i in range(len(queries))]
             for m in ("PM", "AMT")}
    for m, pool in (("PM", None), ("AMT", "embedded:glyph_pool")):
        expected = FewShotClassifier.from_config(cfg, pool=pool).fit(support).predict(queries).labels
        assert shown[m] == expected
        assert set(shown[m]) <= set(support)
    assert sum(a == b for a, b in zip(shown["AMT"], [Path(q).parent.name for q in queries], strict=True)) >= 3
    _screenshot(page, "app_predict.png")

    # attack query 1 at 8/255: both models' adversarial predictions, images and magnified perturbations appear
    page.locator("#amt-query-index input").fill("1")
    page.locator("#amt-attack-button").click()
    table = page.locator("#amt-attack-table")
    table.wait_for()
    for m, pool in (("PM", None), ("AMT", "embedded:glyph_pool")):
        row = table.locator(f"tr.amt-{m.lower()}")
        _, clean, attacked = FewShotClassifier.from_config(cfg, pool=pool).fit(support).attack(queries[:1], 8 / 255)
        assert row.get_attribute("data-clean") == clean.labels[0] == shown[m][0]
        assert row.get_attribute("data-adversarial") == attacked.labels[0]
    page.locator("#amt-attack-gallery img").nth(4).wait_for()  # query + 2 images per model
    assert page.locator("#amt-attack-gallery img").count() >= 5
    _screenshot(page, "app_attack.png")


def test_an_embedded_example_task_fills_the_page_and_is_classified(browser_page):
    page = browser_page
    page.reload()
    page.locator("#amt-example").click()
    support, queries = example_task(load_config("configs/embedded.yaml"), "latin", n_shot=1)  # the page's defaults
    page.locator("#amt-queries td.filename").nth(len(queries) - 1).wait_for()
    assert page.locator("#amt-name-0 textarea, #amt-name-0 input").first.input_value() == list(support)[0]
    page.locator("#amt-classify").click()
    rows = page.locator("#amt-prediction-table tbody tr")
    rows.nth(len(queries) - 1).wait_for()
    labels = [rows.nth(i).locator("td.amt-amt").get_attribute("data-label") for i in range(rows.count())]
    expected = FewShotClassifier.from_config(load_config("configs/embedded.yaml"), pool="embedded:glyph_pool")
    assert labels == expected.fit(support).predict(queries).labels
