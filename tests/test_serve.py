"""clusterar serve: the JSON API (samples, seeds, bad parameters as messages) and the page in a real
headless Chromium (loads, a changed setting changes the image, a bad one shows its message)."""

from __future__ import annotations

import base64
import io
import json
import shutil
import threading
import urllib.error
import urllib.request

import pytest
from PIL import Image

from clusterar.sample import write_ctf_pipeline
from clusterar.serve import SampleServer, make_server
from tests.test_sample import CLASSES, parts, runs  # noqa: F401 (module fixtures)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def server(parts, runs):  # noqa: F811
    pipeline = parts["dir"] / "serve-ctf.json"
    write_ctf_pipeline(runs["coarse"], runs["refiner"], pipeline)
    app = SampleServer([runs["baseline"], pipeline], device="cpu")
    srv = make_server(app, port=0)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


def _post(url: str, body: dict | bytes) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url + "/api/sample", data=data)) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _image(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def test_api_samples_models_by_name_and_seed(server):
    with urllib.request.urlopen(server + "/api/models") as r:
        models = json.loads(r.read())
    assert [(m["name"], m["method"]) for m in models] == [("baseline", "baseline"), ("serve-ctf", "ctf")]
    assert models[1]["defaults"]["temperature"] == 1.1 and models[0]["num_classes"] == CLASSES
    code, a = _post(server, {"model": "baseline", "label": 3, "n": 4, "seed": 7, "temperature": "0.8"})
    assert code == 200 and a["settings"]["temperature"] == 0.8 and "coarse" not in a
    img = _image(a["image"])
    assert img.size == ((2 * (32 + 2) + 2) * 2,) * 2  # a 2x2 grid of 32 px images, 2 px padding, shown at 2x
    _, again = _post(server, {"model": "baseline", "label": 3, "n": 4, "seed": 7, "temperature": "0.8"})
    _, other = _post(server, {"model": "baseline", "label": 3, "n": 4, "seed": 8, "temperature": "0.8"})
    assert again["image"] == a["image"] and other["image"] != a["image"]
    code, c = _post(server, {"model": "serve-ctf", "label": 1, "n": 2, "stage2": "uniform", "top_k2": "3"})
    assert code == 200 and c["settings"]["stage2"] == "uniform" and _image(c["coarse"]).size[0] > 0
    # the page sends every field it has: CTF's stage-2 fields are ignored for other methods
    assert _post(server, {"model": "baseline", "temperature2": "0.5"})[0] == 200
    with urllib.request.urlopen(server + "/") as r:
        page = r.read().decode()
    assert (
        "/api/sample" in page and "http://" not in page and "https://" not in page
    )  # nothing from the internet


@pytest.mark.parametrize(
    "body, message",
    [
        ({"model": "nope"}, "unknown model 'nope'; served: baseline, serve-ctf"),
        ({"model": "baseline", "label": CLASSES}, f"label must be a whole number in [0, {CLASSES - 1}]"),
        ({"model": "baseline", "temperature": 0}, "temperature must be > 0"),
        ({"model": "baseline", "top_k": "1.5"}, "top_k must be a whole number"),
        ({"model": "baseline", "top_p": "x"}, "top_p must be a number"),
        ({"model": "baseline", "n": 1000}, "n must be a whole number in [1, 64]"),
        ({"model": "baseline", "colour": 1}, "unknown parameter 'colour'"),
        ({"model": "serve-ctf", "stage2": "median"}, "stage2 must be one of refiner, uniform, frequency"),
        (b"{not json", "the request is not JSON"),
    ],
)
def test_bad_parameters_are_messages_and_the_server_goes_on(server, body, message):
    code, answer = _post(server, body)
    assert code == 400 and message in answer["error"], answer
    assert _post(server, {"model": "baseline", "n": 1})[0] == 200


def _chromium():
    """A headless Chromium driven by Selenium, or a skip that names what to install."""
    missing = [p for p in ("chromium", "chromedriver") if shutil.which(p) is None]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.options import Options
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("the Python package selenium (pip install -e '.[dev]')")
    if missing:
        pytest.skip(
            "the page test needs headless Chromium: install the Debian packages chromium and chromium-driver "
            f"(`.ci/run` does); missing: {', '.join(missing)}"
        )
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium")
    return webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)


def test_the_page_in_a_real_browser(server):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    browser = _chromium()
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(server + "/")

        def src(css: str):
            found = browser.find_elements(By.CSS_SELECTOR, css)
            return found[0].get_attribute("src") if found else None

        wait.until(lambda b: src("#result-baseline img.samples"))
        first = src("#result-baseline img.samples")
        seed = browser.find_element(By.ID, "seed")
        seed.clear()
        seed.send_keys("5", Keys.TAB)  # the change event redraws
        wait.until(lambda b: src("#result-baseline img.samples") not in (None, first))
        browser.find_element(By.ID, "use-serve-ctf").click()  # a second model, side by side
        wait.until(lambda b: src("#result-serve-ctf img.coarse"))
        assert src("#result-baseline img.samples") and browser.find_element(By.ID, "stage2").is_displayed()
        temperature = browser.find_element(By.ID, "temperature")
        temperature.send_keys("0", Keys.TAB)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#result-baseline .error"))
        assert (
            "temperature must be > 0" in browser.find_element(By.CSS_SELECTOR, "#result-baseline .error").text
        )
    finally:
        browser.quit()
