"""Take the screenshot of `clusterar serve` in docs/serve.md: the demo's three models side by side in headless
Chromium (Debian packages chromium and chromium-driver, Python package selenium).

    python docs/make_serve_screenshot.py                     # the models of `clusterar demo` in runs/demo
    python docs/make_serve_screenshot.py --demo runs/demo2   # another demo folder
"""

from __future__ import annotations

import argparse
import shutil
import sys
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clusterar.serve import SampleServer, make_server  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--demo", default="runs/demo", help="a finished `clusterar demo` folder")
    ap.add_argument("--out", default=str(ROOT / "docs" / "serve.png"))
    args = ap.parse_args()
    runs = Path(args.demo) / "runs"
    ctf = sorted((runs / "ctf" / "pipelines").glob("*.json"))[-1]  # the final models
    app = SampleServer([runs / "baseline", runs / "iar", ctf], device="cpu")
    app.models = {("ctf" if k == ctf.stem else k): v for k, v in app.models.items()}
    srv = make_server(app, port=0)
    threading.Thread(target=srv.serve_forever, daemon=True).start()

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,760"):
        opts.add_argument(arg)
    opts.binary_location = shutil.which("chromium")
    browser = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=opts)
    try:
        wait = WebDriverWait(browser, 120)
        browser.get(f"http://127.0.0.1:{srv.server_address[1]}/")
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#result-baseline img.samples"))
        for name in ("iar", "ctf"):
            browser.find_element(By.ID, f"use-{name}").click()
        Select(browser.find_element(By.ID, "label")).select_by_value("3")
        browser.find_element(By.ID, "n").clear()
        browser.find_element(By.ID, "n").send_keys("9", Keys.TAB)
        browser.find_element(By.ID, "temperature").send_keys("0.7", Keys.TAB)
        wait.until(lambda b: b.find_elements(By.CSS_SELECTOR, "#result-ctf img.coarse"))
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, "img.samples")) == 3)
        browser.save_screenshot(args.out)
        print(f"written: {args.out}")
    finally:
        browser.quit()
        srv.shutdown()


if __name__ == "__main__":
    main()
