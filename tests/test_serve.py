"""clusterar serve: the JSON API (samples, seeds, bad parameters as messages), hostile requests (wrong types,
overflowing values, bad lengths, clients that go away: 400/411/413 and no traceback), the address flags, and
the page in a real headless Chromium (loads, a changed setting changes the image, a bad one shows its message)."""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import socket
import struct
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from clusterar.cli import main
from clusterar.errors import ClusterarError
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


# ----------------------------------------------------------------------------- hostile requests (issue 25)


@pytest.mark.parametrize(
    "body, message",
    [
        ({"model": "baseline", "n": "²"}, "n must be a whole number in [1, 64], got '²'"),
        ({"model": "baseline", "seed": "1" * 5000}, "seed must be a whole number in [0, "),
        ({"model": "baseline", "top_k": "inf"}, "top_k must be a finite number, got 'inf'"),
        ({"model": "baseline", "top_k": "nan"}, "top_k must be a finite number, got 'nan'"),
        ({"model": "baseline", "top_k": "1e400"}, "top_k must be a finite number"),
        ({"model": {"name": "baseline"}}, "unknown model {'name': 'baseline'}; served: baseline, serve-ctf"),
        ({"model": ["baseline"]}, "unknown model ['baseline']"),
        ({"model": "serve-ctf", "stage2": ["refiner"]}, "stage2 must be text, got ['refiner']"),
        # values that overflow float32 in the logits maths (messages as SampleSettings.check words them)
        ({"model": "baseline", "temperature": "1e-300"}, "temperature must be >= 1e-06"),
        ({"model": "baseline", "cfg_scale": "1e300"}, "cfg_scale must lie in [-10000, 10000]"),
        ({"model": "serve-ctf", "temperature2": 1e-300}, "temperature (stage 2) must be >= 1e-06"),
        ({"model": "serve-ctf", "cfg_scale2": -1e300}, "cfg_scale2 must lie in [-10000, 10000]"),
        (b"[" * 30_000, "the request is not JSON: nested too deep"),
        (b'{"a":' * 6_000 + b"1" + b"}" * 6_000, "the request is not JSON: nested too deep"),
    ],
)
def test_malformed_values_and_types_are_messages(server, capfd, body, message):
    code, answer = _post(server, body)
    assert code == 400 and message in answer["error"], answer
    assert _post(server, {"model": "baseline", "n": 1})[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_extreme_but_safe_sampling_values_still_sample(server):
    """The float32 bounds refuse only what overflows: the smallest temperature with the largest CFG scale."""
    for model in ("baseline", "serve-ctf"):
        body = {"model": model, "n": 1, "temperature": "1e-6", "cfg_scale": "-1e4"}
        assert _post(server, body)[0] == 200
    body = {"model": "serve-ctf", "n": 1, "temperature2": 1e-6, "cfg_scale2": 1e4}
    assert _post(server, body)[0] == 200


def _raw(url: str, request: bytes, *, wait: float = 20.0) -> tuple[int, dict]:
    """Send `request` bytes as they are on one socket; the status and JSON of the answer."""
    port = int(url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def _head(length: str | None, extra: str = "") -> bytes:
    lines = ["POST /api/sample HTTP/1.1", "Host: localhost", "Content-Type: application/json"]
    lines += [f"Content-Length: {length}"] if length is not None else []
    return ("\r\n".join(lines) + "\r\n" + extra + "\r\n").encode()


@pytest.mark.parametrize(
    "request_bytes, status, message",
    [
        (_head("abc") + b'{"model": "baseline"}', 400, "Content-Length must be a whole number of bytes >= 0"),
        (_head("-1") + b'{"model": "baseline"}', 400, "got '-1'"),
        (_head(None) + b'{"model": "baseline"}', 411, "needs a Content-Length header"),
        (_head(None, "Transfer-Encoding: chunked\r\n") + b"5\r\n{}\r\n0\r\n\r\n", 411, "not chunked"),
        (_head(str(100_000)), 413, "the request body is 100000 bytes; at most 65536 are read"),
        (_head(str(200_000)) + b"[" * 100_000, 413, "at most 65536 are read"),
    ],
    ids=["length-abc", "length-minus-1", "no-length", "chunked", "over-cap", "nested-100000"],
)
def test_bad_lengths_are_answered_at_once(server, capfd, request_bytes, status, message):
    code, answer = _raw(server, request_bytes)
    assert code == status and message in answer["error"], answer
    assert _post(server, {"model": "baseline", "n": 1})[0] == 200
    assert "Traceback" not in capfd.readouterr().err


def test_api_models_holds_no_absolute_path(server, runs):  # noqa: F811
    with urllib.request.urlopen(server + "/api/models") as r:
        text = r.read().decode()
    models = json.loads(text)

    def strings(x):
        if isinstance(x, dict):
            return [s for v in x.values() for s in strings(v)]
        if isinstance(x, list):
            return [s for v in x for s in strings(v)]
        return [x] if isinstance(x, str) else []

    assert not [s for s in strings(models) if os.path.isabs(s) or os.sep in s]
    assert str(Path(runs["baseline"]).parent) not in text
    # what the page reads from each model
    assert all({"name", "method", "num_classes", "class_names"} <= set(m) for m in models)


def _close_hard(s: socket.socket) -> None:
    """Close with a reset (SO_LINGER 0), as a browser tab closed mid-request does at worst."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def test_clients_that_go_away_print_no_traceback(server, capfd):
    port = int(server.rsplit(":", 1)[1])
    half_body = _head("500") + b'{"model": "base'
    for request, hard in [
        (half_body, False),
        (half_body, True),
        (b"POST /api/sample HTTP/1.1\r\nContent-Le", False),
        (_head("30") + b'{"model": "baseline", "n": 64}', True),  # leaves while its images are drawn
        (b"GET / HTTP/1.0\r\n\r\n", True),
    ]:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(request)
            time.sleep(0.05)
            _close_hard(s) if hard else s.close()
    time.sleep(1.0)
    assert _post(server, {"model": "baseline", "n": 1})[0] == 200
    err = capfd.readouterr().err
    assert "Traceback" not in err and "Error" not in err, err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "70000"], "--port must be a whole number in [0, 65535] (0 picks a free one), got 70000"),
        (["--host", "no-such-host.invalid"], "--host 'no-such-host.invalid' is not an IPv4 address or name"),
    ],
)
def test_serve_port_and_host_are_checked_before_loading(tmp_path, capsys, argv, message):
    assert main(["serve", str(tmp_path / "never-loaded"), "--device", "cpu", *argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and "never-loaded" not in err, err


@pytest.mark.parametrize(
    "host, port, flag",
    [
        ("127.0.0.1", 70000, "--port"),
        ("127.0.0.1", -1, "--port"),
        ("999.1.1.1", 0, "--host"),
        ("192.0.2.1", 0, "--host"),
    ],
)
def test_make_server_names_the_bad_flag(host, port, flag):
    with pytest.raises(ClusterarError) as e:
        make_server(None, host=host, port=port)  # type: ignore[arg-type]  # refused before the app is used
    assert flag in str(e.value) and ("--port" not in str(e.value) if flag == "--host" else True), e.value
