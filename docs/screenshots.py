"""README screenshots of the real app: `make screenshots` (or `python docs/screenshots.py`).

Starts a backend on the embedded model with the shipped results (assets/results) in a temporary
store, the app pointed at it, and headless Chromium; opens the pages, re-runs one generation in
the Frequency lab (1024-token needle prompt at 0.5: FAEDKV's default, then iwdft with a low-pass
plan in both slot normalisations side by side), and writes docs/screenshots/<page>.png. Takes a
minute or two on a laptop CPU.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from test_app_browser import CHROMIUM, CHROMIUM_ARGS, serving, settle  # noqa: E402

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
    from playwright.sync_api import sync_playwright

    OUT.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="faedkv-shots-"))
    with serving(tmp, ["--device", "cpu", "--store", str(tmp / "store")], backend_timeout=300) as url, \
            sync_playwright() as p:
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
        page.get_by_text("Cache stored per layer after compression").wait_for()
        settle(page)
        shoot(page, "frequency-lab")
        page.goto(f"{url}/lab?variant=iwdft&length=1024")
        settle(page)
        page.get_by_role("button", name="Run both normalisations").click()
        page.get_by_text("They differ in: method.params.slot_normalization").wait_for()
        settle(page)
        shoot(page, "frequency-lab-iwdft")
        browser.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
