"""The shape every notebook must have (see the house style), and the generated pages being current."""
import json
import re
from pathlib import Path

import pytest
import yaml

import tasks

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
ARTICLES = {a["slug"]: a for a in tasks.articles()}
CONFIG = yaml.safe_load((ROOT / "_config.yml").read_text(encoding="utf-8"))
BIB_KEYS = set(re.findall(r"@\w+\s*\{\s*([^,\s]+)\s*,", (ROOT / "book" / "references.bib").read_text(encoding="utf-8")))


def load(path):
    return json.loads(path.read_text(encoding="utf-8"))


def source(cell):
    return "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 3


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_structure(path):
    slug = path.stem
    assert slug in ARTICLES, f"{slug} is not in book/articles.csv"
    article = ARTICLES[slug]
    assert article["part"], f"{slug} is not a technical article"
    nb = load(path)
    cells = nb["cells"]
    assert nb["metadata"]["kernelspec"]["name"] == "python3"

    title = source(cells[0])
    assert cells[0]["cell_type"] == "markdown" and title.lstrip().startswith("# ")
    assert article["title_zh"] in title, "the original Chinese title must stand under the title"
    assert "苏剑林" in title, "the title cell must credit 苏剑林 (Su Jianlin)"
    assert f"kexue.fm/archives/{article['archive']}" in title, "link to the original article"
    assert article["date"] in title

    code = [c for c in cells if c["cell_type"] == "code"]
    setup = code[0]["source"]
    setup = source(code[0])
    assert "import companion" in setup and "SCALE = companion.scale()" in setup
    assert "companion.seed_everything(" in setup and "companion.set_num_threads(" in setup
    url = CONFIG["repository"]["url"]
    assert f"git+{url}" in setup, f"the Colab bootstrap must install from {url} (_config.yml)"
    assert "CONFIG" in setup, "one config dict per scale in the setup cell"

    all_code = "\n".join(source(c) for c in code)
    assert re.search(r"^\s*assert ", all_code, re.M), "checks end in asserts"
    assert "companion." in all_code.replace("import companion", "")

    for c in code:
        assert c.get("execution_count") is not None, f"cell never run: {source(c)[:60]!r}"
        for out in c.get("outputs", []):
            assert out["output_type"] != "error", f"stored error in {slug}"
    pngs = [o for c in code for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
    assert pngs, "at least one figure"

    text = "\n".join(source(c) for c in cells if c["cell_type"] == "markdown")
    cited = set(re.findall(r"\{cite(?::\w+)?\}`([^`]+)`", text))
    keys = {k.strip() for group in cited for k in group.split(",")}
    assert keys, "cite the article and the papers from book/references.bib"
    assert keys <= BIB_KEYS, f"unknown citation keys {sorted(keys - BIB_KEYS)}"
    assert "$$" in text, "numbered display equations"


def test_generated_pages_are_current():
    assert (ROOT / "_toc.yml").read_text(encoding="utf-8") == tasks.render_toc(), "run: python3 tasks.py pages"
    assert (ROOT / "book" / "catalogue.md").read_text(encoding="utf-8") == tasks.render_catalogue()
    assert (ROOT / "book" / "reproductions.md").read_text(encoding="utf-8") == tasks.render_reproductions()
    for path in NOTEBOOKS:
        assert (ROOT / "book" / "figures" / f"{path.stem}-ci.png").exists(), "run: python3 tasks.py pages"


def test_toc_lists_exactly_the_notebooks():
    toc = yaml.safe_load((ROOT / "_toc.yml").read_text(encoding="utf-8"))
    files = [ch["file"] for part in toc["parts"] for ch in part["chapters"]]
    listed = sorted(f.split("/", 1)[1] for f in files if f.startswith("notebooks/"))
    assert listed == sorted(p.stem for p in NOTEBOOKS)


def test_catalogue_lists_all_forty_articles():
    assert len(ARTICLES) == 40
    catalogue = (ROOT / "book" / "catalogue.md").read_text(encoding="utf-8")
    for slug, a in ARTICLES.items():
        assert a["title_zh"] in catalogue
        if (ROOT / "notebooks" / f"{slug}.ipynb").exists():
            assert f"(../notebooks/{slug}.ipynb)" in catalogue
    assert "ghostxp" not in " ".join(p.stem for p in NOTEBOOKS)
    assert "not technical: no notebook" in catalogue


def test_every_claim_has_a_row():
    import csv

    with open(ROOT / "book" / "reproductions.csv", encoding="utf-8") as f:
        rows = {r["slug"]: r for r in csv.DictReader(f)}
    for path in NOTEBOOKS:
        assert path.stem in rows, f"add the claim of {path.stem} to book/reproductions.csv"
        row = rows[path.stem]
        assert row["claim"] and row["paper_figure"], path.stem
        assert row["verdict"] in tasks.VERDICTS, f"{path.stem}: verdict {row['verdict']!r}"


PAGE_WIDTH = 88  # characters of code that the rendered page shows without scrolling (1400 px)


def _text_outputs(cell):
    for out in cell.get("outputs", []):
        if out.get("output_type") == "stream":
            yield "".join(out["text"]) if isinstance(out["text"], list) else out["text"]
        else:
            plain = out.get("data", {}).get("text/plain")
            if plain is not None and "image/png" not in out.get("data", {}):
                yield "".join(plain) if isinstance(plain, list) else plain


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_lines_fit_the_page(path):
    """Code lines and printed lines at most 88 characters: the page clips wider ones."""
    wide = []
    for i, cell in enumerate(load(path)["cells"]):
        if cell["cell_type"] != "code":
            continue
        for line in source(cell).splitlines():
            if len(line) > PAGE_WIDTH:
                wide.append(f"cell {i} code ({len(line)}): {line[:60]}...")
        if "remove-output" in cell.get("metadata", {}).get("tags", []):
            continue
        for text in _text_outputs(cell):
            for line in text.splitlines():
                if len(line) > PAGE_WIDTH:
                    wide.append(f"cell {i} output ({len(line)}): {line[:60]}...")
    assert not wide, f"{len(wide)} lines over {PAGE_WIDTH} characters:\n" + "\n".join(wide[:15])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_declared_tolerances_are_valid(path):
    """Every tolerance a cell declares for the numeric comparison parses (tests/nbval_numeric.py)."""
    from tests.nbval_numeric import Tolerance

    for cell in load(path)["cells"]:
        Tolerance.from_metadata(cell.get("metadata", {}))  # raises on a malformed declaration


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_headline_is_glued(path):
    """The reproductions page shows each notebook's headline number from its stored outputs."""
    assert "headline" in tasks.glued_values(path), \
        'call companion.glue("headline", "...") where the headline result is printed'


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_last_cell_links_to_the_api_reference(path):
    cells = load(path)["cells"]
    assert tasks.API_CELL_TAG in cells[-1].get("metadata", {}).get("tags", []), \
        "run: python3 tasks.py pages (adds the API back-link cell)"
    assert source(cells[-1]) == tasks.render_api_cell(path), "run: python3 tasks.py pages"


def test_equation_labels_are_unique_across_the_book():
    """Sphinx numbers equations book-wide: a label used twice fails the build, so each label
    (``$$ ... $$ (label)``) belongs to one notebook, once."""
    label = re.compile(r"\$\$[ \t]*\(([A-Za-z][\w.:-]*)\)[ \t]*$", re.M)
    seen: dict[str, str] = {}
    clashes = []
    for path in NOTEBOOKS:
        for cell in load(path)["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            for name in label.findall(source(cell)):
                if name in seen:
                    clashes.append(f"{name}: {seen[name]} and {path.stem}")
                seen[name] = path.stem
    assert not clashes, "equation labels used twice: " + "; ".join(clashes)
