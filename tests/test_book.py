"""The book: built with warnings as errors, then every page opened in headless Chromium.

On each notebook page: MathJax typeset the math (no raw TeX left), every figure loaded (non-zero
natural width), and no internal link is broken. MathJax is served from a local copy (npm's
`mathjax@3`, installed by `python3 tasks.py test`) in place of the CDN, since tests run offline;
every other request that leaves the built site is blocked.
"""
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MATHJAX = Path(os.environ.get("COMPANION_MATHJAX", ROOT / ".cache/mathjax/node_modules/mathjax/es5"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("book")
    cmd = [str(Path(sys.executable).parent / "jupyter-book"), "build", str(ROOT), "--all",
           "--warningiserror", "--keep-going", "--path-output", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"book build failed (warnings are errors):\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
    html = out / "_build" / "html"
    assert (html / "index.html").exists()
    return html


def test_book_builds_with_every_page(site):
    for slug in NOTEBOOKS:
        assert (site / "notebooks" / f"{slug}.html").exists()
    for page in ("intro", "how-to-run", "catalogue", "reproductions", "references"):
        assert (site / "book" / f"{page}.html").exists()


class _Anchors(HTMLParser):
    def __init__(self):
        super().__init__()
        self.ids, self.links = set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if attrs.get("id"):
            self.ids.add(attrs["id"])
        if tag == "a" and attrs.get("name"):
            self.ids.add(attrs["name"])
        if tag == "a" and attrs.get("href"):
            self.links.append(attrs["href"])


def _parse(path: Path) -> _Anchors:
    p = _Anchors()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def test_no_broken_internal_link(site):
    broken = []
    pages = sorted(site.rglob("*.html"))
    parsed = {p: _parse(p) for p in pages}
    for page, anchors in parsed.items():
        for href in anchors.links:
            parts = urlsplit(href)
            if parts.scheme or parts.netloc or href.startswith("mailto:"):
                continue
            target = page if not parts.path else (page.parent / unquote(parts.path)).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.exists():
                broken.append(f"{page.relative_to(site)}: {href} (no such file)")
                continue
            if parts.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else _parse(target).ids
                if unquote(parts.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)}: {href} (no such anchor)")
    assert not broken, "broken internal links:\n" + "\n".join(broken[:40])


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.fail("Chromium is not installed: `python3 tasks.py test` installs Debian's chromium")
    if not (MATHJAX / "tex-chtml.js").exists():
        pytest.fail(f"MathJax not found at {MATHJAX}: `python3 tasks.py test` installs it from npm")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=[
            "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield b
        b.close()


def _route_offline(page, site: Path):
    def handle(route):
        url = route.request.url
        if url.startswith("file://"):
            return route.continue_()
        marker = "/mathjax@3/es5/"
        if marker in url:
            local = MATHJAX / urlsplit(url).path.split(marker, 1)[1]
            if local.is_file():
                return route.fulfill(path=str(local))
        return route.abort()

    page.route("**/*", handle)


CHECK_JS = """
async () => {
  const main = document.querySelector('main') || document.body;
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) { await MathJax.startup.promise; }
  const imgs = Array.from(main.querySelectorAll('img'));
  await Promise.all(imgs.map(img => img.complete ? null : new Promise(r => { img.onload = img.onerror = r; })));
  const mathBlocks = Array.from(main.querySelectorAll('.math'));
  const raw = mathBlocks.filter(el => !el.querySelector('mjx-container')).map(el => el.textContent.slice(0, 80));
  return {
    typeset: main.querySelectorAll('mjx-container').length,
    mathBlocks: mathBlocks.length,
    rawMath: raw,
    dollars: (main.innerText.match(/\\$\\$/g) || []).length,
    images: imgs.length,
    badImages: imgs.filter(img => !(img.naturalWidth > 0)).map(img => img.getAttribute('src').slice(0, 80)),
  };
}
"""


@pytest.mark.parametrize("slug", NOTEBOOKS)
def test_notebook_page_in_chromium(site, browser, slug):
    page = browser.new_page()
    _route_offline(page, site)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((site / "notebooks" / f"{slug}.html").as_uri(), wait_until="load")
    page.wait_for_function("() => window.MathJax && MathJax.startup && MathJax.startup.promise", timeout=30_000)
    result = page.evaluate(CHECK_JS)
    page.close()
    assert result["typeset"] > 0, "MathJax typeset nothing"
    assert not result["rawMath"], f"math left untypeset: {result['rawMath'][:5]}"
    assert result["dollars"] == 0, "raw $$ left in the page"
    assert result["images"] > 0 and not result["badImages"], f"figures that did not load: {result['badImages']}"
    assert not [e for e in errors if "MathJax" in e], errors


@pytest.mark.parametrize("name", ["intro", "catalogue", "reproductions", "how-to-run"])
def test_book_page_in_chromium(site, browser, name):
    page = browser.new_page()
    _route_offline(page, site)
    page.goto((site / "book" / f"{name}.html").as_uri(), wait_until="load")
    result = page.evaluate(CHECK_JS)
    page.close()
    assert not result["badImages"], f"figures that did not load: {result['badImages']}"
    assert result["dollars"] == 0
