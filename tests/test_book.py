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

import tasks

ROOT = Path(__file__).resolve().parents[1]


NOTEBOOKS = sorted(p.stem for p in (ROOT / "notebooks").glob("*.ipynb"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
MATHJAX = Path(os.environ.get("COMPANION_MATHJAX", ROOT / ".cache/mathjax/node_modules/mathjax/es5"))


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    prebuilt = os.environ.get("COMPANION_SITE")  # a site already built (to test old pages)
    if prebuilt:
        return Path(prebuilt)
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
  const article = document.querySelector('article.bd-article') || main;
  const colRight = article.getBoundingClientRect().right;
  const describe = el => (el.textContent || '').replace(/\\s+/g, ' ').trim().slice(0, 70);
  // display equations whose typeset width exceeds their box (or the column): clipped or scrolled
  const wideMath = Array.from(main.querySelectorAll('mjx-container[display="true"]')).filter(c => {
    const m = c.querySelector('mjx-math');
    if (!m) return false;
    const box = c.closest('div.math') || c.parentElement;
    const w = m.getBoundingClientRect().width;
    return w > box.clientWidth + 1 || m.getBoundingClientRect().right > colRight + 1;
  }).map(c => (c.closest('div.math') || c).id || describe(c));
  // code cells and outputs wider than their column (a reader would scroll sideways)
  const widePre = Array.from(main.querySelectorAll('pre')).filter(p =>
    p.scrollWidth > p.clientWidth + 1 || p.getBoundingClientRect().right > colRight + 1
  ).map(p => describe(p));
  // tables wider than the column (their wrapper would scroll sideways)
  const wideTables = Array.from(main.querySelectorAll('table')).filter(t =>
    t.getBoundingClientRect().right > colRight + 1 ||
    (t.parentElement && t.parentElement.scrollWidth > t.parentElement.clientWidth + 1)
  ).map(t => describe(t));
  const eqnos = Array.from(main.querySelectorAll('span.eqno')).map(e => e.textContent.replace(/[^0-9.]/g, ''));
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
    wideMath: wideMath,
    widePre: widePre,
    wideTables: wideTables,
    eqnos: eqnos,
  };
}
"""


VIEWPORT = {"width": 1400, "height": 1000}

# Does a CJK character render with a real glyph? Ink of U+82CF (a Chinese character) against
# that of an unassigned code point (U+0378), drawn in the font of the page's Chinese title: with
# no CJK font both are the same missing-glyph box.
GLYPH_JS = """
(sample) => {
  const el = Array.from(document.querySelectorAll('main p, main h1, main h2'))
    .find(e => /[\\u4e00-\\u9fff]/.test(e.textContent));
  if (!el) return {found: false};
  const font = getComputedStyle(el).font;
  const ink = ch => {
    const c = document.createElement('canvas'); c.width = 64; c.height = 64;
    const g = c.getContext('2d'); g.font = font.replace(/\\d+(\\.\\d+)?px/, '40px');
    g.fillStyle = '#000'; g.fillText(ch, 4, 48);
    return Array.from(g.getImageData(0, 0, 64, 64).data.filter((_, i) => i % 4 === 3));
  };
  const a = ink(sample), b = ink('\\u0378');
  return {found: true, text: el.textContent.slice(0, 40), inked: a.some(v => v > 0),
          differs: a.some((v, i) => v !== b[i])};
}
"""


def _open(browser, site: Path, rel: str):
    page = browser.new_page(viewport=VIEWPORT)
    _route_offline(page, site)
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto((site / rel).as_uri(), wait_until="load")
    return page, errors


@pytest.fixture(scope="module")
def notebook_page(site, browser):
    """Each notebook page opened once at 1400 x 1000 (MathJax done), its checks evaluated."""
    cache = {}

    def get(slug):
        if slug not in cache:
            page, errors = _open(browser, site, f"notebooks/{slug}.html")
            page.wait_for_function(
                "() => window.MathJax && MathJax.startup && MathJax.startup.promise",
                timeout=30_000)
            cache[slug] = (page.evaluate(CHECK_JS), errors)
            page.close()
        return cache[slug]
    return get


@pytest.mark.parametrize("slug", NOTEBOOKS)
def test_notebook_fits_the_column(notebook_page, slug):
    """At 1400 x 1000 no display equation and no code or output block is wider than its column."""
    result, _ = notebook_page(slug)
    assert not result["wideMath"], f"display equations wider than the column: {result['wideMath']}"
    assert not result["widePre"], (f"{len(result['widePre'])} code/output blocks wider than the "
                                   f"column, e.g. {result['widePre'][:3]}")


@pytest.mark.parametrize("slug", NOTEBOOKS)
def test_equations_numbered_per_notebook(notebook_page, slug):
    """Each notebook numbers its equations (1), (2), ... on its own page."""
    numbers = notebook_page(slug)[0]["eqnos"]
    if numbers:
        assert numbers == [str(i) for i in range(1, len(numbers) + 1)], numbers


def test_chinese_title_renders_with_real_glyphs(site, browser):
    page, _ = _open(browser, site, f"notebooks/{NOTEBOOKS[0]}.html")
    result = page.evaluate(GLYPH_JS, "\u82cf")
    page.close()
    assert result["found"], "no Chinese text on the page"
    assert result["inked"] and result["differs"], (
        f"the Chinese title {result.get('text')!r} renders as missing-glyph boxes: no CJK font "
        "(python3 tasks.py test installs Debian's fonts-noto-cjk)")


@pytest.mark.parametrize("slug", NOTEBOOKS)
def test_notebook_page_in_chromium(notebook_page, slug):
    result, errors = notebook_page(slug)
    assert result["typeset"] > 0, "MathJax typeset nothing"
    assert not result["rawMath"], f"math left untypeset: {result['rawMath'][:5]}"
    assert result["dollars"] == 0, "raw $$ left in the page"
    assert result["images"] > 0 and not result["badImages"], f"figures that did not load: {result['badImages']}"
    assert not [e for e in errors if "MathJax" in e], errors


API_PAGES = ["api/index"] + [f"api/{m}" for m in tasks.api_modules()]


@pytest.mark.parametrize("name", ["intro", "catalogue", "reproductions", "how-to-run"] + API_PAGES)
def test_book_page_in_chromium(site, browser, name):
    page, _ = _open(browser, site, f"book/{name}.html")
    result = page.evaluate(CHECK_JS)
    page.close()
    assert not result["badImages"], f"figures that did not load: {result['badImages']}"
    assert result["dollars"] == 0
    assert not result["widePre"], f"blocks wider than the column: {result['widePre'][:3]}"
    assert not result["wideTables"], f"tables wider than the column: {result['wideTables'][:2]}"
    assert not result["wideMath"], f"equations wider than the column: {result['wideMath'][:3]}"


def test_api_reference_documents_every_public_name(site):
    """Every name in each module's __all__ has an entry (with its signature) on its page, and
    each entry used by a notebook links to it."""
    import importlib

    for m in tasks.api_modules():
        module = importlib.import_module("companion" if m == "core" else f"companion.{m}")
        html = (site / "book" / "api" / f"{m}.html").read_text(encoding="utf-8")
        for name in module.__all__:
            if callable(getattr(module, name)):
                assert f'id="{module.__name__}.{name}"' in html, f"{m}: no entry for {name}"
    losses = (site / "book" / "api" / "losses.html").read_text(encoding="utf-8")
    assert "Used in:" in losses and "../../notebooks/flatnce.html" in losses
