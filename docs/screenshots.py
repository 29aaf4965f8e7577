"""README screenshots of the real app: `make screenshots` (or `python docs/screenshots.py`).

Starts a backend on the embedded model with the shipped results (assets/results) in a temporary
store, the app pointed at it, and headless Chromium; opens the pages, re-runs one generation in
the Frequency lab (1024-token needle prompt, FAEDKV at 0.5 with a low-pass plan), and writes
docs/screenshots/<page>.png. Takes a minute or two on a laptop CPU.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_app_browser import (CHROMIUM, CHROMIUM_ARGS, _free_port, _stop, _wait_http,  # noqa: E402
                              settle)

OUT = ROOT / "docs" / "screenshots"
PAGES = {"overview": "", "spectra": "spectra", "token-contribution": "contribution",
         "ablation": "ablation"}


def shoot(page, name: str, width: int = 1400) -> None:
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": width, "height": min(int(height) + 20, 4000)})
    settle(page)
    page.screenshot(path=str(OUT / f"{name}.png"))
    page.set_viewport_size({"width": width, "height": 1000})
    print(f"wrote {OUT / (name + '.png')}")


def main() -> int:
    import os
    import subprocess

    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="faedkv-shots-"))
    backend_port, app_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("FAEDKV_BACKEND_URL", "FAEDKV_TOKEN")}
    env["PYTHONPATH"] = str(ROOT)
    backend_log, app_log = tmp / "backend.log", tmp / "app.log"
    backend = subprocess.Popen(
        [sys.executable, "-m", "analysis.server", "--device", "cpu", "--port", str(backend_port),
         "--store", str(tmp / "store")],
        cwd=ROOT, env=env, stdout=open(backend_log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    app = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/Home.py", "--server.headless", "true",
         "--server.port", str(app_port), "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env={**env, "FAEDKV_BACKEND_URL": f"http://127.0.0.1:{backend_port}"},
        stdout=open(app_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{app_port}"
    try:
        _wait_http(f"http://127.0.0.1:{backend_port}/health", 300, backend, backend_log)
        _wait_http(f"{url}/_stcore/health", 60, app, app_log)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.set_default_timeout(300_000)
            for name, path in PAGES.items():
                page.goto(f"{url}/{path}")
                settle(page)
                shoot(page, name)
            page.goto(f"{url}/lab")
            settle(page)
            page.get_by_label("length (tokens)").fill("1024")
            page.get_by_label("length (tokens)").press("Tab")
            settle(page)
            page.get_by_role("button", name="Re-run generation").click()
            page.get_by_text("Cache length per layer after compression").wait_for()
            settle(page)
            shoot(page, "frequency-lab")
            browser.close()
    finally:
        _stop(app)
        _stop(backend)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
