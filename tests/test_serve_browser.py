"""The explorer page in a real browser: headless Chromium submits a prompt, and the heat map it
draws shows the library's own trajectory. A screenshot is kept as a test artefact
(`$JAXLENS_TEST_ARTIFACTS`, default `test-artifacts/` in the repository)."""

import os
import pathlib
import threading

import chromium
import numpy as np
import pytest
import tiny_models

from jaxlens.lens import TunedLens
from jaxlens.models import load_model
from jaxlens.serve.explorer import Explorer
from jaxlens.serve.server import make_server
from jaxlens.trajectory_lib import PredictionTrajectory

REPO = pathlib.Path(__file__).resolve().parents[1]
PROMPT = "Friends, Romans, countrymen,\nlend me your ears;"


def _shown(token: str) -> str:
    """How the page writes a token in a cell (heatmap.js's `shown`)."""
    if token == "":
        return "∅"
    visible = token.replace("\n", "↵").replace("\t", "⇥")
    return visible.replace(" ", "␣") if visible.strip() == "" else visible


@pytest.fixture(scope="module")
def served(tiny_lm):
    model = load_model(tiny_lm)
    translators = tiny_models.random_translators(model.num_layers, model.d_model, scale=0.5)
    lens = TunedLens(decoder=model.decoder(), translators=translators)
    server = make_server(Explorer(model, lens, top_k=3), "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    host, port = server.server_address[:2]
    yield model, lens, f"http://{host}:{port}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    reason = chromium.missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"the browser test must run in CI: {reason}")
        pytest.skip(reason)
    driver = chromium.start(tmp_path_factory.mktemp("chromium-profile"))
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def _wait_for(driver, state: str):
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(
        lambda d: d.find_element("tag name", "body").get_attribute("data-state") in (state, "error")
    )
    return driver.find_element("tag name", "body").get_attribute("data-state")


def _submit(driver, text: str):
    box = driver.find_element("id", "text")
    box.clear()
    box.send_keys(text)
    driver.find_element("id", "show").click()


def test_the_heat_map_shows_the_trajectorys_top_tokens(served, browser):
    from selenium.webdriver.common.action_chains import ActionChains

    model, lens, url = served
    browser.get(url)
    assert _wait_for(browser, "ready") == "ready"
    assert browser.find_element("id", "lens").get_attribute("value") == "tuned"
    _submit(browser, PROMPT)
    assert _wait_for(browser, "shown") == "shown", browser.find_element("id", "error").text

    reference = PredictionTrajectory.from_lens(lens, model, PROMPT)
    top = reference.token_strings(reference.log_probs_ltv.argmax(-1))
    cells = browser.find_elements("css selector", "td.cell")
    assert len(cells) == top.size
    rows = {name: i for i, name in enumerate(reference.layer_names)}
    for cell in cells:
        row, col = rows[cell.get_attribute("data-row")], int(cell.get_attribute("data-col"))
        assert cell.get_attribute("textContent") == _shown(top[row, col]), (row, col)
    inputs = [
        td.get_attribute("textContent") for td in browser.find_elements("css selector", "td.input")
    ]
    assert inputs == [_shown(t) for t in reference.tokens]
    entropy = reference.entropy().values_lt
    value = float(cells[0].get_attribute("data-value"))  # the first cell drawn: output, position 0
    np.testing.assert_allclose(value, entropy[-1, 0], atol=2e-4)

    # Hovering a cell lists its top-k tokens with their probabilities.
    ActionChains(browser).move_to_element(cells[1]).perform()
    tip = browser.find_element("css selector", ".jaxlens-tip")
    ids, probs = reference.top_k(3)
    expected = [_shown(t) for t in reference.token_strings(ids[-1, 1])]
    shown = [td.get_attribute("textContent") for td in tip.find_elements("css selector", "td")]
    assert shown[0::2] == expected
    assert shown[1::2] == [f"{100 * p:.1f}%" if p >= 0.001 else "<0.1%" for p in probs[-1, 1]]

    artifacts = pathlib.Path(os.environ.get("JAXLENS_TEST_ARTIFACTS", REPO / "test-artifacts"))
    artifacts.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(artifacts / "explorer.png"))


def test_a_bad_text_shows_the_error_and_the_page_recovers(served, browser):
    _, _, url = served
    browser.get(url)
    _wait_for(browser, "ready")
    _submit(browser, "word" + " word" * 79)
    assert _wait_for(browser, "shown") == "error"
    assert "at most 64 fit" in browser.find_element("id", "error").text
    _submit(browser, "Once more unto the breach")
    assert _wait_for(browser, "shown") == "shown"
    assert browser.find_element("id", "error").text == ""


def test_the_notebook_view_draws_the_same_heat_map(served, browser, tmp_path):
    from jaxlens.serve.page import view_html

    model, lens, _ = served
    view = Explorer(model, lens, top_k=3).view(PROMPT, lens="difference", layers=(1, 2))
    page = tmp_path / "cell.html"
    page.write_text(f"<!doctype html><meta charset='utf-8'><body>{view_html(view)}</body>")
    browser.get(page.as_uri())
    cells = browser.find_elements("css selector", "td.cell")
    drawn = {(c.get_attribute("data-row"), int(c.get_attribute("data-col"))): c for c in cells}
    assert len(drawn) == 3 * view["num_tokens"]  # layers 1 and 2, and the output
    for r, name in enumerate(view["layer_names"]):
        for col, token in enumerate(view["top_tokens"][r]):
            assert drawn[name, col].get_attribute("textContent") == _shown(token)
