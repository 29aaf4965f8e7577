"""End to end in a real browser: a backend on the tiny random Llama, the app pointed at it, and
headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Opens every page (each names the backend's model), computes spectra from the Spectra page,
exports its heatmap as PNG (checked with PIL) and finds it again on the Export page of a fresh
session; re-runs generation in the Frequency lab (both slot normalisations side by side, a
sink + window the budget cannot hold, own text without a validation error); starts a large
needle grid (asked to confirm), reloads the page while it runs, and cancels it from the
re-attached progress bar; saves a screenshot of every page to tests/artifacts/<page>.png.
"""
import contextlib
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.browser

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
PAGES = {"overview": "", "spectra": "spectra", "frequency_lab": "lab",
         "token_contribution": "contribution", "needle": "needle", "ablation": "ablation",
         "export": "export"}


def _free_port() -> int:
    from analysis.api.client import free_port

    return free_port()


def _wait_http(url: str, timeout: float, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited ({process.returncode}):\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer in {timeout} s:\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(5)


@contextlib.contextmanager
def serving(workdir: Path, backend_args: list[str], backend_timeout: float = 120):
    """A backend (`python -m analysis.service.server <backend_args>`) and the app pointed at it; yields
    the app's URL and stops both. Logs go to workdir."""
    backend_port, app_port = _free_port(), _free_port()
    env = {k: v for k, v in os.environ.items() if k not in ("FAEDKV_BACKEND_URL", "FAEDKV_TOKEN")}
    env["PYTHONPATH"] = str(ROOT)
    backend_log, app_log = workdir / "backend.log", workdir / "app.log"
    backend = subprocess.Popen(
        [sys.executable, "-m", "analysis.service.server", *backend_args, "--port", str(backend_port)],
        cwd=ROOT, env=env, stdout=open(backend_log, "wb"), stderr=subprocess.STDOUT,
        start_new_session=True)
    app = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app/Home.py", "--server.headless", "true",
         "--server.port", str(app_port), "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env={**env, "FAEDKV_BACKEND_URL": f"http://127.0.0.1:{backend_port}"},
        stdout=open(app_log, "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_http(f"http://127.0.0.1:{backend_port}/health", backend_timeout, backend, backend_log)
        _wait_http(f"http://127.0.0.1:{app_port}/_stcore/health", 60, app, app_log)
        yield f"http://127.0.0.1:{app_port}"
    finally:
        _stop(app)
        _stop(backend)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """A backend on tiny-random-llama with an empty store, and the app pointed at it."""
    tmp = tmp_path_factory.mktemp("e2e")
    (tmp / "no-assets").mkdir()
    with serving(tmp, ["--model", "tiny-random-llama", "--store", str(tmp / "store"),
                       "--import-assets", str(tmp / "no-assets")]) as url:
        yield url


@pytest.fixture(scope="module")
def page(app_url):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
        tab = context.new_page()
        tab.set_default_timeout(60_000)
        # the first session registers the pages (st.navigation): a direct /lab before it shows
        # Streamlit's "Page not found" dialog over the page
        open_page(tab, app_url, "")
        yield tab
        browser.close()


def settle(page) -> None:
    """Wait until Streamlit finished running the script and every Plotly chart has drawn."""
    page.wait_for_selector("h1")
    page.wait_for_function("() => !document.querySelector('[data-testid=\"stStatusWidget\"]')")
    time.sleep(0.5)
    charts = page.locator(".js-plotly-plot").count()
    if charts:
        page.wait_for_function("n => document.querySelectorAll('.js-plotly-plot .main-svg')"
                               ".length >= n", arg=charts)


def open_page(page, app_url: str, path: str) -> None:
    page.goto(f"{app_url}/{path}")
    settle(page)
    assert page.locator("[data-testid='stException']").count() == 0


def screenshot(page, name: str) -> None:
    """The whole page (Streamlit scrolls inside its main block: grow the viewport to fit)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    height = page.evaluate("() => document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": 1400, "height": min(int(height) + 20, 6000)})
    settle(page)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"))
    page.set_viewport_size({"width": 1400, "height": 1000})
    assert (ARTIFACTS / f"{name}.png").stat().st_size > 10_000


def main_text(page) -> str:
    return page.locator("[data-testid='stMain']").inner_text()


def test_every_page_opens_without_an_exception(page, app_url):
    for path in PAGES.values():
        open_page(page, app_url, path)
        assert "Backend model tiny-random-llama" in main_text(page), path
    open_page(page, app_url, "")
    assert "tiny-random-llama" in page.locator("[data-testid='stMain']").inner_text()


def test_spectra_compute_then_export_png(page, app_url, tmp_path):
    from PIL import Image

    open_page(page, app_url, "spectra")
    page.get_by_label("text length (tokens)").fill("512")
    page.get_by_label("text length (tokens)").press("Tab")
    page.get_by_role("button", name="Compute spectra").click()
    page.get_by_text("Energy of keys by layer and frequency").wait_for(timeout=90_000)
    settle(page)
    assert "512 tokens of essays" in page.locator("[data-testid='stMain']").inner_text()
    with page.expect_download(timeout=60_000) as download:
        page.get_by_role("button", name="PNG", exact=True).first.click()
    assert download.value.suggested_filename.startswith("spectra-heatmap_tiny-random-llama")
    target = tmp_path / "heatmap.png"
    download.value.save_as(target)
    image = Image.open(io.BytesIO(target.read_bytes()))
    image.load()
    assert image.format == "PNG" and image.width >= 1000 and image.height >= 300
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is None or len(colours) > 50          # a real heatmap, not a blank canvas

    open_page(page, app_url, "export")                   # a typed URL: a fresh session
    # a fresh session's script can run twice on load; the first run's elements stay (stale) until
    # the second ends, so wait for the finished page rather than read it once
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with contextlib.suppress(PlaywrightTimeout):      # the assert below says what was there
        page.wait_for_function(
            "() => { const t = document.querySelector('[data-testid=\"stMain\"]').innerText;"
            " return t.includes('spectra-heatmap_tiny-random-llama') && !t.includes('No figure yet'); }",
            timeout=60_000)
    settle(page)
    text = main_text(page)
    assert "No figure yet" not in text and "spectra-heatmap_tiny-random-llama" in text, text


def set_number(page, label: str, value: int) -> None:
    field = page.get_by_label(label, exact=True)
    field.fill(str(value))
    field.press("Tab")
    settle(page)


def test_frequency_lab_reruns_generation(page, app_url):
    open_page(page, app_url, "lab")
    page.get_by_role("button", name="Drop in all layers").wait_for()
    set_number(page, "length (tokens)", 256)
    page.get_by_role("button", name="Re-run generation").click()
    page.get_by_text("Cache stored per layer after compression").wait_for(timeout=90_000)
    settle(page)
    text = main_text(page)
    # FAEDKV's default: the dimension split behind KVzip's ranking (its passes ran on the backend)
    assert "Full cache" in text and "faedkv-dimsplit" in text and "exact_scorer=kvzip" in text
    # diagnostics are on by default: the real backend measured them, the lab drew both heatmaps
    assert "Attention-output error vs the full cache" in text and "Jensen" in text
    assert "Middle mass, compressed middle / full cache" in text
    screenshot(page, "frequency_lab")

    open_page(page, app_url, "lab?variant=iwdft&length=256")   # a link: iwdft with its own defaults
    page.get_by_role("button", name="Re-run generation").click()
    page.get_by_text("Cache length per layer after compression").wait_for(timeout=90_000)
    settle(page)
    assert "faedkv-iwdft" in main_text(page) and "cache kept" in main_text(page)
    page.get_by_role("button", name="Run both normalisations").click()
    page.get_by_text("They differ in: method.params.slot_normalization").wait_for(timeout=90_000)
    settle(page)
    text = main_text(page)
    assert "slots: sum" in text and "slots: mean" in text      # side by side

    set_number(page, "sink tokens", 4096)
    set_number(page, "recent window", 65536)
    assert "Stale" in main_text(page)
    page.get_by_role("button", name="Re-run generation").click()
    page.get_by_text("could not hold sink 4096 + window 65536").or_(
        page.get_by_text("Nothing was compressed")).first.wait_for(timeout=90_000)
    assert "Stale" not in main_text(page)

    page.get_by_text("my own text").click()
    settle(page)
    text = main_text(page)
    assert "Paste the text to compress" in text and "pydantic" not in text


def test_needle_grid_survives_a_reload_and_cancels(page, app_url):
    open_page(page, app_url, "needle")
    set_number(page, "samples", 20)
    page.get_by_role("button", name="Start grid").click()
    # 800 cells and no grid timed yet: the page asks first
    page.get_by_text("This grid is large").wait_for(timeout=30_000)
    assert "800 cells" in main_text(page)
    page.get_by_role("button", name="Start anyway").click()
    page.wait_for_function(
        "() => /needle grid running: [1-9]/.test(document.body.innerText)", timeout=120_000)
    assert "job=" in page.url
    page.reload()                                  # a new session: the job must be found again
    settle(page)
    page.wait_for_function(
        "() => /needle grid running: [1-9]/.test(document.body.innerText)", timeout=60_000)
    page.get_by_role("button", name="Cancel").first.click()
    page.get_by_text("Needle exact by depth and context length").wait_for(timeout=60_000)
    settle(page)
    assert "full" in page.locator(".js-plotly-plot").first.inner_text()
    assert "job=" not in page.url


def test_screenshots_of_every_page(page, app_url):
    for name, path in PAGES.items():
        if name != "frequency_lab":          # taken with a generation result, above
            open_page(page, app_url, path)
            screenshot(page, name)
