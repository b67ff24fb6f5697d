"""The documentation site in a real headless browser (the system's chromium over the DevTools protocol, see
tests/browser.py): the home page and the API reference of ``g3n.load`` render, the client-side search finds
``decompose``, and no page requests anything outside 127.0.0.1. Saves screenshots of the home page and of the
``g3n.load`` entry to docs/assets/.

Skipped only when no chromium binary is found (or the docs extra is missing) outside CI; .ci/run installs
Debian's chromium and sets G3N_REQUIRE_BROWSER=1, under which a missing browser is a failure."""

from __future__ import annotations

import pytest

from browser import CANDIDATES, Browser, find_chromium, screenshot_target, serve
from docs_site import REQUIRED, ROOT, built_site, missing_docs_tools

ASSETS = ROOT / "docs" / "assets"


def _unavailable() -> str | None:
    if find_chromium() is None:
        return f"no chromium binary found (looked for {', '.join(CANDIDATES)}); .ci/run installs Debian's"
    missing = missing_docs_tools()
    if missing:
        return f"the docs extra is not installed (missing {missing}): pip install -e '.[docs]'"
    return None


@pytest.fixture(scope="module")
def site_browser():
    reason = _unavailable()
    if reason:
        if REQUIRED:
            pytest.fail(reason)
        pytest.skip(reason)
    with serve(built_site()) as base, Browser() as browser:
        yield base, browser


def _settled(browser: Browser, base: str) -> None:
    """The page finished loading, mkdocs-material's scripts ran, nothing reached outside or failed."""
    browser.wait_for("typeof document$ !== 'undefined' && document.querySelector('.md-search__input') !== null")
    assert browser.outside(base) == [], f"requests outside 127.0.0.1: {browser.outside(base)}"
    assert browser.failed == [], f"failed requests: {browser.failed}"
    assert browser.errors == [], f"console errors: {browser.errors}"


def test_the_home_page_renders(site_browser, tmp_path):
    base, browser = site_browser
    browser.open(base)
    _settled(browser, base)
    assert browser.evaluate("document.querySelector('h1').firstChild.textContent.trim()") == "g3n_probe"
    text = browser.evaluate("document.querySelector('article').innerText")
    assert "Gemma 3n" in text and "API reference" in text
    # the stylesheet applied: the header is laid out by mkdocs-material's CSS, not the browser's defaults
    assert browser.evaluate("getComputedStyle(document.querySelector('.md-header')).position") in ("sticky", "fixed")
    browser.screenshot(screenshot_target(ASSETS / "screenshot-home.png", tmp_path))


def test_the_reference_of_load_renders(site_browser, tmp_path):
    base, browser = site_browser
    browser.open(base + "reference/loading/#g3n_probe.load")
    _settled(browser, base)
    heading = browser.evaluate("document.getElementById('g3n_probe.load').textContent")
    assert "g3n_probe.load" in heading
    entry = browser.evaluate("document.getElementById('g3n_probe.load').parentElement.innerText")
    assert "source" in entry and "attn_implementation" in entry      # the signature and the docstring
    browser.evaluate("document.getElementById('g3n_probe.load').scrollIntoView()")
    browser.screenshot(screenshot_target(ASSETS / "screenshot-api-load.png", tmp_path))


def test_the_search_finds_decompose(site_browser):
    base, browser = site_browser
    browser.open(base)
    _settled(browser, base)
    browser.evaluate("document.querySelector('.md-search__input').focus()")
    browser.type_text("decompose")
    found = browser.wait_for(
        "Array.from(document.querySelectorAll('.md-search-result__item')).map(e => e.innerText).join('\\n')",
        timeout=30)
    assert "decompose" in found.lower()
    links = browser.evaluate("Array.from(document.querySelectorAll('.md-search-result__item a')).map(a => a.href)")
    assert any("reference/analysis/" in link or "guides/analysis/" in link for link in links), links
    assert any(url.endswith("search/search_index.json") for url in browser.requests)   # searched here, client-side
    assert browser.outside(base) == [] and browser.failed == [] and browser.errors == []


def test_no_page_requests_anything_outside(site_browser):
    base, browser = site_browser
    pages = ["", "guides/loading/", "guides/points/", "guides/analysis/", "guides/features/", "guides/circuits/",
             "guides/performance/", "reference/", "reference/sae/", "notebooks/", "notebooks/07_patching/"]
    for page in pages:
        browser.open(base + page)
        _settled(browser, base)
    assert browser.requests, "no request was recorded"
